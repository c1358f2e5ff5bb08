"""One prepared check of rwkv-chat's CUDA path on a machine with one NVIDIA GPU.

Run it through scripts/gpu_check.sh (which makes rwkv==0.8.32 importable first). Sections, each
one guarded (a failure prints FAIL with the reason and the next section runs), under one global
time budget (--budget, default 440 s; a section that would not fit is skipped, and a timer stops
everything that is left when the budget is spent):

  env         torch, GPU, nvcc, the reference package, cuda.status()
  build       our kernels built in parallel processes (common + head sizes 32/64/128)
  kernels     `pytest -m gpu tests/engine/test_cuda_kernels.py` (each kernel vs its twin, graphs),
              run in the background during strategies and parity, reported after them
  strategies  every strategy form: cosine to our fp32 logits, peak GPU memory; `*N+` streaming
              must use less GPU memory than the same strategy without streaming
  parity      every version under `cuda fp16`: ours vs rwkv==0.8.32 (RWKV_CUDA_ON=1), and ours vs
              our own fp32
  speed       v7 and v6 at the 1.5B shape (24 x 2048, random weights): prefill and decode tok/s,
              ours (eager, with the kernels) beside the reference on the same
              card. Targets: decode >= 2x the reference's `cuda fp16`, prefill >= 1x.

Results: printed, and written to $OUT (or --out) as gpu_check.log and gpu_check.json.

    python scripts/gpu_check.py --device cpu     # dry run: the same code paths, tiny models, CPU
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout under test, not an installed copy

TOKENS_SEED = 1234
CHUNK = 256  # prefill chunk, as in Pipeline.prefill and the reference's chat


class Budget(BaseException):
    """The global time budget ran out (a BaseException so section guards don't swallow it)."""


# ---------------------------------------------------------------------------------------------
# Reporting


class Report:
    def __init__(self, out_dir: Path, budget: float):
        self.start = time.monotonic()
        self.budget = budget
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(out_dir / "gpu_check.log", "w", buffering=1)
        self.results: dict = {"sections": {}, "targets": {}}
        self.verdicts: list[tuple[str, str]] = []  # (section, PASS/FAIL/SKIP + detail)

    def print(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.log.write(line + "\n")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    @contextlib.contextmanager
    def section(self, name: str, needs_s: float = 0.0):
        self.print(f"\n=== {name}  (t={self.elapsed():.0f}s, {self.left():.0f}s left)")
        if self.left() < needs_s:
            self.verdict(name, f"SKIP (needs ~{needs_s:.0f}s, {self.left():.0f}s left in the budget)")
            yield False
            return
        t0 = time.monotonic()
        try:
            yield True
        except Budget:
            self.verdict(name, "FAIL (global time budget ran out inside this section)")
            raise
        except Exception as error:  # one broken section must not stop the others
            tail = "".join(traceback.format_exception(error)[-6:])
            self.print(tail.rstrip())
            self.verdict(name, f"FAIL ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
        finally:
            self.results["sections"].setdefault(name, {})["seconds"] = round(time.monotonic() - t0, 1)

    def verdict(self, what: str, text: str) -> None:
        """text: 'PASS ...', 'FAIL ...' or 'SKIP ...'."""
        self.verdicts.append((what, text))
        self.print(self._line(what, text))

    @staticmethod
    def _line(what: str, text: str) -> str:
        status, _, detail = text.partition(" ")
        return f"{status:5s} {what}" + (f": {detail}" if detail else "")

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.verdict(what, ("PASS " if ok else "FAIL ") + detail)

    def save(self) -> None:
        self.results["verdicts"] = [{"what": w, "verdict": v} for w, v in self.verdicts]
        self.results["seconds"] = round(self.elapsed(), 1)
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))

    def summary(self) -> int:
        self.print(f"\n=== summary ({self.elapsed():.0f}s)")
        failures = 0
        for what, text in self.verdicts:
            self.print("  " + self._line(what, text))
            failures += text.startswith("FAIL")
        self.save()
        return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# Background processes (builds, the reference, big checkpoints) started by this script only


class Background:
    def __init__(self, folder: Path):
        self.folder = folder
        self.jobs: dict[str, tuple[subprocess.Popen, Path, float]] = {}

    def start(self, name: str, command: list[str], env: dict | None = None) -> None:
        log_path = self.folder / f"{name}.log"
        log = open(log_path, "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
        self.jobs[name] = (process, log_path, time.monotonic())

    def wait(self, name: str, timeout: float) -> tuple[int | None, float, str]:
        """(exit code or None on timeout, seconds since start, end of the log)."""
        process, log_path, started = self.jobs[name]
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started, log_path.read_text(errors="replace")[-3000:]

    def stop(self, name: str) -> None:
        process = self.jobs[name][0]
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the process group this script started
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in self.jobs:
            self.stop(name)


# ---------------------------------------------------------------------------------------------
# Plan: what runs where


class Plan:
    """Model shapes, strategies and devices for the real run (cuda) or the dry run (cpu)."""

    def __init__(self, device: str):
        self.device = device
        self.gpu = device == "cuda"
        if self.gpu:
            self.parity_shape = (4, 256)
            self.strategy_shape = (6, 512)
            self.speed_shape = (24, 2048)
            self.prefill_tokens, self.decode_tokens, self.graph_tokens = 512, 32, 128
            self.head_sizes = (32, 64, 128)
        else:
            self.parity_shape = (2, 128)
            self.strategy_shape = (2, 128)
            self.speed_shape = (2, 256)
            self.prefill_tokens, self.decode_tokens, self.graph_tokens = 64, 4, 8
            self.head_sizes = ()
        self.vocab = 65536
        self.speed_versions = ("7", "6")

    def base(self, dtype: str) -> str:
        return f"{self.device} {dtype}"

    def strategies(self, n_layer: int, gpus: int) -> list[tuple[str, str]]:
        """(label, strategy) pairs; the label is the strategy form from the brief."""
        half = max(1, n_layer // 2)
        d = self.device
        forms = [
            ("fp32", f"{d} fp32"),
            ("fp16", f"{d} fp16"),
            ("bf16", f"{d} bf16"),
            ("fp16i8", f"{d} fp16i8"),
            (f"fp16i8 *{half} -> fp16", f"{d} fp16i8 *{half} -> {d} fp16"),
            ("fp16i8 *1+ (streamed)", f"{d} fp16i8 *1+"),
            (f"fp16 *{half} -> cpu fp32", f"{d} fp16 *{half} -> cpu fp32"),
        ]
        if self.gpu and gpus >= 2:
            forms.append(("cuda:0 -> cuda:1", "cuda:0 fp16 -> cuda:1 fp16"))
        return forms


def random_tokens(n: int, seed: int = TOKENS_SEED, vocab: int = 65536) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(n)]


def cosine(a, b) -> float:
    import torch

    a, b = a.float().flatten(), b.float().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The reference (rwkv==0.8.32) runs in its own process: it reads its environment at import


def reference_command(request: Path, result: Path) -> list[str]:
    return [sys.executable, "-u", str(Path(__file__).resolve()), "--reference-worker", str(request), str(result)]


def reference_env(v7: bool, cuda_on: bool) -> dict:
    from rwkv_chat.testing.reference import reference_env as shared_env

    env = shared_env(v7=v7, cuda_on=cuda_on, jit=True, drop=("RWKV_RESCALE_LAYER",))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout
    return env


def reference_worker(request_path: str, result_path: str) -> None:
    """Subprocess side: jobs {"path", "strategy", "kind": "logits"|"speed", ...} -> torch.save."""
    import types

    import torch

    torch.set_flush_denormal(True)
    jobs = json.loads(Path(request_path).read_text())
    from rwkv import model as reference  # reads RWKV_V7_ON / RWKV_CUDA_ON now (and builds kernels)

    from rwkv_chat.testing.reference import open_reference_model

    reference.gc = types.SimpleNamespace(collect=lambda *a: 0)  # its loader gc.collect()s per layer
    v7 = os.environ.get("RWKV_V7_ON") == "1"
    results = []
    for job in jobs:
        t0 = time.perf_counter()
        path = job["path"]
        model = open_reference_model(reference, path, job["strategy"], v7)
        load_s = time.perf_counter() - t0
        device = "cuda" if job["strategy"].startswith("cuda") else "cpu"
        if job["kind"] == "logits":
            state, logits = None, []
            for batch in job["batches"]:
                out, state = model.forward(batch, state)
                logits.append(out.float().cpu().reshape(-1))
            results.append({"logits": logits, "load_s": load_s})
        else:
            results.append(dict(speed_run(model.forward, job, device), load_s=load_s))
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    torch.save(results, result_path)


def speed_run(forward, job: dict, device: str) -> dict:
    """Prefill tok/s (chunks of CHUNK tokens) and eager decode tok/s (logits copied to the CPU
    every token, as a sampler needs) for any `forward(tokens, state) -> (logits, state)`."""
    tokens = random_tokens(CHUNK + job["prefill"] + job["decode"], seed=job.get("seed", TOKENS_SEED))
    warm, tokens = tokens[:CHUNK], tokens[CHUNK:]
    _, state = forward(warm, None)  # warm-up at the timed shapes: kernels built, GEMMs chosen
    out, state = forward(warm[:1], state)
    out.float().cpu()
    sync(device)
    prompt = tokens[:job["prefill"]]
    t0 = time.perf_counter()
    state = None
    for start in range(0, len(prompt), CHUNK):
        out, state = forward(prompt[start:start + CHUNK], state)
    out.float().cpu()
    sync(device)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for token in tokens[job["prefill"]:]:
        out, state = forward([token], state)
        out.float().cpu()
    decode_s = time.perf_counter() - t0
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": job["decode"] / decode_s}


def start_reference(bg: Background, name: str, jobs: list[dict], v7: bool, cuda_on: bool, work: Path) -> Path:
    request, result = work / f"{name}.request.json", work / f"{name}.result.pt"
    request.write_text(json.dumps(jobs))
    bg.start(name, reference_command(request, result), reference_env(v7, cuda_on))
    return result


def reference_results(bg: Background, name: str, result: Path, timeout: float, report: Report):
    import torch

    code, seconds, tail = bg.wait(name, timeout)
    if code != 0 or not result.exists():
        why = "timed out" if code is None else f"exit {code}"
        report.print(f"reference process {name} {why} after {seconds:.0f}s; end of its log:\n{tail[-1500:]}")
        raise RuntimeError(f"the reference process {name} {why}")
    report.print(f"reference process {name}: done in {seconds:.0f}s")
    return torch.load(result, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Sections


def section_env(report: Report, plan: Plan) -> None:
    import torch

    from rwkv_chat.engine import cuda

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1), "gpus": torch.cuda.device_count()}
    nvcc = cuda._nvcc()
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info["nvcc"] = f"{nvcc}: {version[-1] if version else '?'}"
    try:
        import importlib.metadata

        info["rwkv"] = importlib.metadata.version("rwkv")
    except Exception as error:
        info["rwkv"] = f"NOT importable ({error})"
    info["rwkv_chat"] = str(REPO)
    info["cuda.status"] = cuda.status()
    for key, value in info.items():
        report.print(f"  {key:14s} {value}")
    report.results["env"] = info
    if plan.gpu and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")


def start_builds(bg: Background, plan: Plan) -> list[str]:
    env = dict(os.environ, RWKV_CUDA_ON="1")
    names = []
    for head_size in (None, *plan.head_sizes):
        name = f"build-{head_size or 'common'}"
        code = f"from rwkv_chat.engine import cuda; import sys; ok = cuda.load({head_size}); print(cuda.status()); sys.exit(0 if ok else 1)"
        bg.start(name, [sys.executable, "-c", code], env)
        names.append(name)
    return names


def section_build(report: Report, bg: Background, names: list[str]) -> None:
    from rwkv_chat.engine import cuda

    for name in names:
        code, seconds, tail = bg.wait(name, min(300, report.left() - 30))
        ok = code == 0
        report.check(f"build {name[6:]}", ok, f"{seconds:.0f}s" + ("" if ok else f": {cuda.first_error_line(tail)}"))
        if not ok:
            report.print(tail[-2000:])
    os.environ["RWKV_CUDA_ON"] = "1"
    cuda.load(64)  # from the cache now
    report.print("  " + cuda.status())


def start_kernel_tests(bg: Background) -> None:
    """The GPU tests run in the background while strategies and parity run here (not during speed)."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/engine/test_cuda_kernels.py", "-q", "-rs",
               "-p", "no:cacheprovider", "--no-header"]
    bg.start("kernel-tests", command, dict(os.environ, RWKV_CUDA_ON="1"))


def section_kernels(report: Report, plan: Plan, bg: Background) -> None:
    timeout = max(10, min(300, report.left() - 150))
    code, seconds, _ = bg.wait("kernel-tests", timeout)
    output = bg.jobs["kernel-tests"][1].read_text(errors="replace")
    report.print(f"  pytest -m gpu tests/engine/test_cuda_kernels.py: {seconds:.0f}s")
    lines = output.strip().splitlines()
    summary = next((l for l in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", l)), "no summary")
    failed = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    for line in failed[:30]:
        report.print("  " + line[:300])
    if code is None:
        bg.stop("kernel-tests")  # the speed section needs the GPU to itself
        report.print(output[-3000:])
        report.check("kernels (pytest -m gpu)", False, f"still running after {seconds:.0f}s")
        return
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    if not plan.gpu:
        report.verdict("kernels (pytest -m gpu)", f"SKIP (dry run on CPU: {summary.strip('= ')})")
        return
    if failed or code != 0:
        report.print("\n".join(lines[-60:]))
    report.check("kernels (pytest -m gpu)", code == 0 and passed > 0, summary.strip("= "))


def make_checkpoints(folder: Path, shape: tuple[int, int], vocab: int, tag: str) -> dict[str, Path]:
    from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

    paths = {}
    for version in ("4", "5.2", "6", "7"):
        path = folder / f"{tag}-v{version}.pth"
        if not path.exists():
            save_checkpoint(path, make_checkpoint(version, *shape, vocab_size=vocab, seed=11))
        paths[version] = path
    return paths


def parity_batches() -> list[list[int]]:
    tokens = random_tokens(40, seed=7)
    return [tokens[:24], tokens[24:25], tokens[25:26], tokens[26:33], [0], [11, 261]]


def run_ours(model, batches) -> list:
    state, logits = None, []
    for batch in batches:
        out, state = model.forward(batch, state)
        logits.append(out.float().cpu().reshape(-1))
    return logits


def release(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def section_parity(report: Report, plan: Plan, bg: Background, pending: dict, models: dict) -> None:
    from rwkv_chat.engine import cuda
    from rwkv_chat.engine.model import RWKV

    base = plan.base("fp16" if plan.gpu else "fp32")
    batches = parity_batches()
    reference = {}
    for name, (result, versions) in pending.items():
        try:
            for version, logits in zip(versions, reference_results(bg, name, result, report.left() - 60, report)):
                reference[version] = logits["logits"]
        except RuntimeError as error:  # compare with our own fp32 all the same
            report.verdict(f"parity reference {name}", f"FAIL ({error})")
    table = report.results.setdefault("parity", {})
    report.print(f"  {'version':8s} {'vs rwkv 0.8.32 (' + base + ')':>34s} {'ours ' + base + ' vs our cpu fp32':>32s}  kernels used")
    for version in ("4", "5.2", "6", "7"):
        before = cuda.kernel_calls()
        ours = run_ours(RWKV(models[version], strategy=base), batches)
        used = {k: v - before.get(k, 0) for k, v in cuda.kernel_calls().items() if v - before.get(k, 0)}
        release(plan.device)
        fp32 = run_ours(RWKV(models[version], strategy="cpu fp32"), batches)
        ref = reference.get(version)
        cos_ref = min(cosine(a, b) for a, b in zip(ours, ref)) if ref else float("nan")
        diff_ref = max(float((a - b).abs().max()) for a, b in zip(ours, ref)) if ref else float("nan")
        cos_fp32 = min(cosine(a, b) for a, b in zip(ours, fp32))
        report.print(f"  v{version:7s} cos {cos_ref:.6f} max|d| {diff_ref:9.4f}        cos {cos_fp32:.6f}"
                     f"           {used or 'none'}")
        table[version] = {"cos_vs_reference": cos_ref, "max_abs_vs_reference": diff_ref,
                          "cos_vs_own_fp32": cos_fp32, "kernels": used}
        # fp16 vs fp16 of the same weights: only rounding differs (fp32 in the dry run: ~1e-6)
        bar = 0.999 if plan.gpu else 0.99999
        report.check(f"parity v{version} {base} vs rwkv 0.8.32", cos_ref >= bar, f"min cosine {cos_ref:.6f} (bar {bar})")
        report.check(f"parity v{version} {base} vs own fp32", cos_fp32 >= 0.98, f"min cosine {cos_fp32:.6f} (bar 0.98)")


def section_strategies(report: Report, plan: Plan, models: dict) -> None:
    import torch

    from rwkv_chat.engine.model import RWKV

    gpus = torch.cuda.device_count() if plan.gpu else 0
    n_layer = plan.strategy_shape[0]
    prompt = random_tokens(32, seed=3)
    steps = [[t] for t in random_tokens(8, seed=4)]
    batches = [prompt, *steps]
    table = report.results.setdefault("strategies", {})
    for version in ("4", "5.2", "6", "7"):
        if report.left() < 40:
            report.verdict(f"strategies v{version}", "SKIP (time budget)")
            continue
        reference = run_ours(RWKV(models[version], strategy="cpu fp32"), batches)
        report.print(f"  v{version} {plan.strategy_shape[0]}x{plan.strategy_shape[1]}: "
                     f"{'form':26s} {'min cos vs fp32':>16s} {'peak MiB':>9s} {'resident MiB':>13s}")
        rows = {}
        for label, strategy in plan.strategies(n_layer, gpus):
            try:
                peak, resident, logits = measure_strategy(RWKV, models[version], strategy, batches, plan)
            except Exception as error:
                report.verdict(f"strategy v{version} {strategy}", f"FAIL ({type(error).__name__}: {error})")
                continue
            cos = min(cosine(a, b) for a, b in zip(logits, reference))
            rows[label] = {"strategy": strategy, "cos": cos, "peak_mib": peak, "resident_mib": resident}
            fmt = lambda v: f"{v:9.1f}" if v is not None else "      n/a"
            report.print(f"      {label:30s} {cos:16.6f} {fmt(peak)} {fmt(resident):>13s}")
            if cos < 0.98:
                report.verdict(f"strategy v{version} {strategy}", f"FAIL (min cosine {cos:.4f} < 0.98)")
        table[version] = rows
        report.check(f"strategies v{version}: all forms ran with cosine >= 0.98",
                     len(rows) == len(plan.strategies(n_layer, gpus)) and all(r["cos"] >= 0.98 for r in rows.values()))
        streamed, resident = rows.get("fp16i8 *1+ (streamed)"), rows.get("fp16i8")
        if plan.gpu and streamed and resident:
            report.check(f"strategies v{version}: streaming lowers GPU memory",
                         streamed["peak_mib"] < resident["peak_mib"] and streamed["resident_mib"] < resident["resident_mib"],
                         f"peak {streamed['peak_mib']:.1f} vs {resident['peak_mib']:.1f} MiB, resident "
                         f"{streamed['resident_mib']:.1f} vs {resident['resident_mib']:.1f} MiB")
    if plan.gpu and gpus < 2:
        report.verdict("strategy cuda:0 -> cuda:1", "SKIP (one GPU)")


def measure_strategy(RWKV, path, strategy, batches, plan):
    """(peak MiB, resident MiB after loading, logits) for one strategy; memory None on the CPU."""
    import torch

    release(plan.device)
    if plan.gpu:
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        base = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
    model = RWKV(path, strategy=strategy)
    resident = None
    if plan.gpu:
        resident = (sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) - base) / 2**20
    logits = run_ours(model, batches)
    peak = None
    if plan.gpu:
        peak = (sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) - base) / 2**20
    del model
    release(plan.device)
    return peak, resident, logits


def section_speed(report: Report, plan: Plan, bg: Background, big: dict, work: Path) -> None:
    from rwkv_chat.engine import cuda
    from rwkv_chat.engine.model import RWKV

    strategy = plan.base("fp16" if plan.gpu else "fp32")
    job = {"kind": "speed", "strategy": strategy, "prefill": plan.prefill_tokens, "decode": plan.decode_tokens}
    table = report.results.setdefault("speed", {})
    for version in plan.speed_versions:
        if report.left() < (120 if plan.gpu else 20):
            report.verdict(f"speed v{version}", "SKIP (time budget)")
            continue
        code, _, tail = bg.wait(f"checkpoint-v{version}", report.left() - 60)
        if code != 0:
            raise RuntimeError(f"making the v{version} checkpoint failed: {tail[-500:]}")
        path = big[version]
        rows = {}
        t0 = time.perf_counter()
        model = RWKV(path, strategy=strategy)
        load_s = time.perf_counter() - t0
        forward = model.forward

        def attempt(name, measure):  # one failing row (say, a graph capture) keeps the others
            try:
                rows[name] = measure()
            except Exception as error:
                report.verdict(f"speed v{version} {name}", f"FAIL ({type(error).__name__}: {error})")

        before = sum(cuda.kernel_calls().values())
        attempt("rwkv-chat eager", lambda: speed_run(forward, job, plan.device))
        routed = sum(cuda.kernel_calls().values()) > before
        del model, forward
        release(plan.device)
        # the reference, alone on the card now
        result = start_reference(bg, f"reference-speed-v{version}", [dict(job, path=str(path))],
                                 v7=version == "7", cuda_on=plan.gpu, work=work)
        reference = reference_results(bg, f"reference-speed-v{version}", result, report.left() - 20, report)[0]
        rows["rwkv 0.8.32" + (" (RWKV_CUDA_ON=1)" if plan.gpu else "")] = reference
        shape = f"{plan.speed_shape[0]}x{plan.speed_shape[1]}"
        report.print(f"  v{version} {shape} {strategy}: load {load_s:.1f}s (reference {reference['load_s']:.1f}s);"
                     f" engine routes to the kernels: {routed}")
        report.print(f"      {'':40s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
        for name, row in rows.items():
            prefill = f"{row['prefill_tok_s']:14.1f}" if "prefill_tok_s" in row else " " * 14
            extra = f"  (capture {row['capture_s']:.2f}s{'' if row.get('graph') else ', eager: no GPU'})" if "capture_s" in row else ""
            report.print(f"      {name:40s} {prefill} {row['decode_tok_s']:13.1f}{extra}")
        table[version] = rows
        ours = {n: r for n, r in rows.items() if n.startswith("rwkv-chat")}
        if not ours:
            raise RuntimeError(f"no speed measurement of rwkv-chat worked for v{version}")
        best_decode = max(r["decode_tok_s"] for r in ours.values())
        best_prefill = max((r["prefill_tok_s"] for r in ours.values() if "prefill_tok_s" in r), default=0.0)
        plain_prefill = rows.get("rwkv-chat eager", {}).get("prefill_tok_s", 0.0)
        decode_x = best_decode / reference["decode_tok_s"]
        prefill_x = best_prefill / reference["prefill_tok_s"]
        report.results["targets"][f"v{version}"] = {"decode_x": decode_x, "prefill_x": prefill_x,
                                                    "prefill_x_unpatched": plain_prefill / reference["prefill_tok_s"]}
        if plan.gpu:
            report.check(f"speed v{version}: decode >= 2x reference", decode_x >= 2, f"{decode_x:.2f}x")
            report.check(f"speed v{version}: prefill >= 1x reference", prefill_x >= 1,
                         f"{prefill_x:.2f}x" + ("" if routed else f" (with kernels patched in; engine as is "
                                                f"{plain_prefill / reference['prefill_tok_s']:.2f}x)"))
        else:
            report.verdict(f"speed v{version}", f"SKIP (dry run on CPU; decode {decode_x:.2f}x, prefill {prefill_x:.2f}x)")


# ---------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the real check; cpu: a dry run of the same code paths with tiny models")
    parser.add_argument("--budget", type=float, default=440.0, help="global time budget in seconds (default 440)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "rwkv-gpu-check"),
                        help="where gpu_check.log / gpu_check.json go (default: $OUT, else a temp folder)")
    parser.add_argument("--sections", default="env,build,kernels,parity,strategies,speed")
    parser.add_argument("--reference-worker", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_worker:
        reference_worker(*args.reference_worker)
        return 0

    sections = set(args.sections.split(","))
    report = Report(Path(args.out), args.budget)
    plan = Plan(args.device)
    work = Path(tempfile.mkdtemp(prefix="rwkv-gpu-check-"))
    bg = Background(work)

    def out_of_time(signum, frame):
        raise Budget()

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(args.budget)))
    report.print(f"rwkv-chat GPU check, device {args.device}, budget {args.budget:.0f}s, work folder {work}")
    code = 1
    try:
        import torch

        torch.set_flush_denormal(True)
        with report.section("env") as go:
            if go:
                section_env(report, plan)

        # Everything slow and independent starts now, in the background.
        builds = start_builds(bg, plan) if plan.gpu and sections & {"build", "kernels", "parity", "speed"} else []
        models = make_checkpoints(work, plan.parity_shape, plan.vocab, "parity")
        pending = {}
        if "parity" in sections:
            base = plan.base("fp16" if plan.gpu else "fp32")
            for v7, versions in ((True, ["7"]), (False, ["4", "5.2", "6"])):
                name = f"reference-parity-{'v7' if v7 else 'v4-v6'}"
                jobs = [{"kind": "logits", "path": str(models[v]), "strategy": base, "batches": parity_batches()}
                        for v in versions]
                pending[name] = (start_reference(bg, name, jobs, v7, plan.gpu, work), versions)
        big = {}
        if "speed" in sections:
            for version in plan.speed_versions:
                big[version] = work / f"speed-v{version}.pth"
                layers, embd = plan.speed_shape
                bg.start(f"checkpoint-v{version}", [sys.executable, "-m", "rwkv_chat.testing.checkpoints", "--version",
                                                    version, "--layers", str(layers), "--embd", str(embd),
                                                    str(big[version])])

        if builds:
            with report.section("build") as go:
                if go:
                    section_build(report, bg, builds)
        if "kernels" in sections:
            start_kernel_tests(bg)
        # strategies first: parity waits for the reference, which is still building its kernels
        if "strategies" in sections:
            strategy_models = make_checkpoints(work, plan.strategy_shape, plan.vocab, "strategies")
            with report.section("strategies", needs_s=60) as go:
                if go:
                    section_strategies(report, plan, strategy_models)
        if "parity" in sections:
            with report.section("parity", needs_s=30) as go:
                if go:
                    section_parity(report, plan, bg, pending, models)
        if "kernels" in sections:
            with report.section("kernels") as go:
                if go:
                    section_kernels(report, plan, bg)
        if "speed" in sections:
            with report.section("speed", needs_s=90 if plan.gpu else 10) as go:
                if go:
                    section_speed(report, plan, bg, big, work)
        signal.alarm(0)
        code = report.summary()
    except Budget:
        report.print(f"\nTIMEOUT: the global budget of {args.budget:.0f}s ran out; the sections above are all that ran")
        report.verdict("global time budget", f"FAIL (ran out after {report.elapsed():.0f}s)")
        code = report.summary() or 2
    finally:
        signal.alarm(0)
        bg.stop_all()
        report.save()
        for path in work.glob("*.pth"):
            path.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
