"""`rwkv-chat bench`: prefill and decode speed, time to first token and peak memory of a strategy,
optionally next to the reference implementation (`rwkv==0.8.32`, run in a subprocess).

    rwkv-chat bench --model PATH --strategy "cpu bf16i8" [--prompt-tokens 512 --decode-tokens 64]
    python -m rwkv_chat.benchmark --model PATH --strategy "cpu fp32" --compare-reference

What is measured (best of `--repeats` runs each, as the machine may be shared):
* prefill: a prompt of N random token ids fed with `forward` in chunks of `--chunk-len` (256, as
  the chat pipeline does), tokens per second; time to first token = that wall time (the prompt's
  logits are ready to sample from);
* decode: tokens fed one at a time after the prompt (each the argmax of the previous logits),
  tokens per second; ours runs each step inside `model.decoding()`, as the chat pipeline does;
* memory: peak RSS of the process (VmHWM: loading included) and the model's own share, the RSS
  growth from before loading to after the run.

The reference runs in a child process (it reads environment variables at import, and its memory
must not mix with ours) with `torch.set_flush_denormal(True)`, `RWKV_JIT_ON=1`, `RWKV_CUDA_ON=0`.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import click

from .testing.reference import REFERENCE_PACKAGE, REFERENCE_VERSION, reference_available, reference_env


@dataclass
class BenchResult:
    implementation: str  # "rwkv-chat" or "rwkv 0.8.32"
    strategy: str
    model: str
    version: str = ""
    prompt_tokens: int = 0
    decode_tokens: int = 0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    ttft_s: float = 0.0
    load_s: float = 0.0
    peak_rss_mb: float = 0.0
    model_rss_mb: float = 0.0
    threads: int = 0
    prefill_runs: list[float] = field(default_factory=list)  # tok/s of every run
    decode_runs: list[float] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Memory


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    current = peak = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
        current = peak
    return current, peak


def prompt_ids(n: int, vocab: int = 65536, seed: int = 0) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(vocab, 65530), (n,), generator=generator).tolist()


def _timed_runs(forward, prompt, decode_tokens, chunk_len, repeats, decode_step=contextlib.nullcontext):
    """Shared by ours and the reference: `forward(tokens, state) -> (logits, state)`; every decode
    step (argmax included) runs inside `decode_step()`, as the pipeline runs its sampling."""
    prefill, decode = [], []
    state_after_prompt = None
    logits_after_prompt = None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        state, logits = None, None
        for i in range(0, len(prompt), chunk_len):
            logits, state = forward(prompt[i:i + chunk_len], state)
        prefill.append(time.perf_counter() - start)
        state_after_prompt, logits_after_prompt = state, logits
    for _ in range(max(1, repeats) if decode_tokens else 0):
        state, logits = state_after_prompt, logits_after_prompt
        start = time.perf_counter()
        for _ in range(decode_tokens):
            with decode_step():
                logits, state = forward([int(logits.argmax())], state)
        decode.append(time.perf_counter() - start)
    return prefill, decode


def _fill(result: BenchResult, prefill, decode, prompt_tokens, decode_tokens):
    result.prefill_runs = [round(prompt_tokens / t, 2) for t in prefill]
    result.prefill_tok_s = max(result.prefill_runs)
    result.ttft_s = min(prefill)
    if decode:
        result.decode_runs = [round(decode_tokens / t, 2) for t in decode]
        result.decode_tok_s = max(result.decode_runs)


def bench_ours(model_path: str, strategy: str, prompt_tokens: int = 512, decode_tokens: int = 64,
               chunk_len: int = 256, repeats: int = 3, threads: int | None = None) -> BenchResult:
    import torch

    from .engine import RWKV

    if threads:
        torch.set_num_threads(threads)
    result = BenchResult("rwkv-chat", strategy, str(model_path), prompt_tokens=prompt_tokens,
                         decode_tokens=decode_tokens, threads=torch.get_num_threads())
    gc.collect()
    before, _ = rss_mb()
    start = time.perf_counter()
    model = RWKV(model_path, strategy, progress=None)
    result.load_s = time.perf_counter() - start
    result.version = model.version
    prompt = prompt_ids(prompt_tokens, model.vocab_size)
    model.forward(prompt[:8])  # warm-up: first-call allocations, kernel loading
    prefill, decode = _timed_runs(lambda t, s: model.forward(t, s), prompt, decode_tokens, chunk_len, repeats,
                                  model.decoding)
    _fill(result, prefill, decode, prompt_tokens, decode_tokens)
    gc.collect()
    after, peak = rss_mb()
    result.peak_rss_mb, result.model_rss_mb = round(peak, 1), round(after - before, 1)
    return result


# ---------------------------------------------------------------------------------------------
# The reference, in a child process

_REFERENCE_CHILD = r'''
import gc, json, os, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_flush_denormal(True)
if args["threads"]:
    torch.set_num_threads(args["threads"])
path = args["model"]
_torch_load = torch.load
def _load_without_code(*args, **kwargs):  # the reference's torch.load: never run a pickle's code
    return _torch_load(*args, **{**kwargs, "weights_only": True})
torch.load = _load_without_code
sys.path.insert(0, args["package_root"])
from rwkv_chat.testing.reference import is_v7_checkpoint, load_reference_module, open_reference_model
v7 = is_v7_checkpoint(path)
reference = load_reference_module(v7, skip_gc=False)  # its load time is measured as it is
import rwkv
from rwkv_chat.benchmark import BenchResult, _fill, _timed_runs, prompt_ids, rss_mb
result = BenchResult(f"rwkv {getattr(rwkv, '__version__', '') or args['reference_version']}", args["strategy"], path,
                     prompt_tokens=args["prompt_tokens"], decode_tokens=args["decode_tokens"],
                     threads=torch.get_num_threads(), version="7" if v7 else "")
gc.collect()
before, _ = rss_mb()
start = time.perf_counter()
with torch.no_grad():
    model = open_reference_model(reference, path, args["strategy"], v7, verbose=True)
    result.load_s = time.perf_counter() - start
    if not v7:
        result.version = str(getattr(model, "version", ""))
    prompt = prompt_ids(args["prompt_tokens"], 65536)
    model.forward(prompt[:8], None)
    prefill, decode = _timed_runs(lambda t, s: model.forward(t, s), prompt, args["decode_tokens"],
                                  args["chunk_len"], args["repeats"])
_fill(result, prefill, decode, args["prompt_tokens"], args["decode_tokens"])
gc.collect()
after, peak = rss_mb()
result.peak_rss_mb, result.model_rss_mb = round(peak, 1), round(after - before, 1)
print("RESULT " + json.dumps(result.to_dict()))
'''


def bench_reference(model_path: str, strategy: str, prompt_tokens: int = 512, decode_tokens: int = 64,
                    chunk_len: int = 256, repeats: int = 3, threads: int | None = None,
                    timeout: float = 3600) -> BenchResult:
    """The reference on the same model, in a child process. `error` is set when it cannot run."""
    result = BenchResult(f"rwkv {REFERENCE_VERSION}", strategy, str(model_path))
    if not reference_available():
        result.error = f"the reference package is not installed (pip install {REFERENCE_PACKAGE}=={REFERENCE_VERSION})"
        return result
    from .engine.loader import resolve_path

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = reference_env(cuda_on=False, jit=os.environ.get("RWKV_JIT_ON", "1") == "1",
                        drop=("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",))
    with tempfile.TemporaryDirectory(prefix="rwkv-chat-reference-") as folder:
        # the very file our loader takes (the reference appends ".pth" to a name without it)
        checked = resolve_path(model_path).resolve()
        if checked.suffix != ".pth":
            named = os.path.join(folder, "model.pth")
            try:
                os.symlink(checked, named)
            except OSError:  # no symlinks here (Windows without the privilege): a copy
                shutil.copyfile(checked, named)
            checked = named
        args = dict(model=str(checked), strategy=strategy, prompt_tokens=prompt_tokens,
                    decode_tokens=decode_tokens, chunk_len=chunk_len, repeats=repeats, threads=threads or 0,
                    package_root=package_root, reference_version=REFERENCE_VERSION)
        try:
            proc = subprocess.run([sys.executable, "-c", _REFERENCE_CHILD, json.dumps(args)], capture_output=True,
                                  text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            result.error = f"the reference ran over {timeout:.0f} s"
            return result
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return BenchResult(**json.loads(line[len("RESULT "):]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    result.error = f"the reference failed (exit {proc.returncode}): {' | '.join(tail)[-500:]}"
    return result


def reference_strategies(strategy: str, version: str) -> list[str]:
    """What the reference runs by default: the same strategy when it can (its v7 code has no int8,
    and it has no int4 at all; for i8a8 its plain int8), else its fp32 and bf16 CPU strategies."""
    text = " ".join(strategy.split()).replace("i8a8", "i8")
    if "i4" in text or ("i8" in text and version == "7"):
        return ["cpu fp32", "cpu bf16"]
    return [text]


# ---------------------------------------------------------------------------------------------
# Output


def format_result(r: BenchResult) -> str:
    if r.error:
        return f"{r.implementation:>12}  {r.strategy:<14} error: {r.error}"
    return (f"{r.implementation:>12}  {r.strategy:<14} prefill {r.prefill_tok_s:8.1f} tok/s   decode "
            f"{r.decode_tok_s:7.2f} tok/s   TTFT {r.ttft_s * 1000:8.1f} ms   peak RSS {r.peak_rss_mb:7.0f} MiB"
            f"   model {r.model_rss_mb:7.0f} MiB")


def ratio_lines(ours: BenchResult, references: list[BenchResult]) -> list[str]:
    """How many times faster ours is than each reference (and than the best of several); a decode
    ratio only where both sides decoded."""

    def line(label: str, prefill: float, decode: float) -> str:
        text = f"  vs {label}: prefill x{ours.prefill_tok_s / prefill:.2f}"
        if decode > 0 and ours.decode_tok_s > 0:
            text += f", decode x{ours.decode_tok_s / decode:.2f}"
        return text

    good = [r for r in references if not r.error and r.prefill_tok_s > 0]
    lines = [line(f"reference {ref.strategy!r}", ref.prefill_tok_s, ref.decode_tok_s) for ref in good]
    if len(good) > 1:
        lines.append(line("the reference's best", max(r.prefill_tok_s for r in good),
                          max(r.decode_tok_s for r in good)))
    return lines


@click.command("bench")
@click.option("--model", "-m", "model_path", type=click.Path(dir_okay=False), envvar="RWKV_CHAT_MODEL",
              help="checkpoint (.pth); default: the built-in demo model. Env: RWKV_CHAT_MODEL.")
@click.option("--demo", is_flag=True, help="benchmark the built-in tiny demo model (ignores --model)")
@click.option("--strategy", "-s", default="cpu fp32", show_default=True, envvar="RWKV_CHAT_STRATEGY",
              help="strategy string, e.g. 'cpu bf16i8'. Env: RWKV_CHAT_STRATEGY.")
@click.option("--prompt-tokens", default=512, show_default=True, type=click.IntRange(1))
@click.option("--decode-tokens", default=64, show_default=True, type=click.IntRange(0))
@click.option("--chunk-len", default=256, show_default=True, type=click.IntRange(1), help="prefill chunk length")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="runs; the best counts")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads (default: torch's)")
@click.option("--compare-reference", is_flag=True, help=f"also run rwkv=={REFERENCE_VERSION} and print ratios")
@click.option("--reference-strategy", "reference_strategy", multiple=True,
              help="strategy for the reference (repeatable; default: the same, or cpu fp32 + cpu bf16)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def bench(model_path, demo, strategy, prompt_tokens, decode_tokens, chunk_len, repeats, threads, compare_reference,
          reference_strategy, as_json):
    """Measure prefill/decode speed, time to first token and peak memory of a strategy.

    \b
    Examples:
      rwkv-chat bench --demo --decode-tokens 32
      rwkv-chat bench -m model.pth -s "cpu bf16i8" --compare-reference
    """
    if demo or not model_path:
        from .demo import demo_model_path

        model_path = str(demo_model_path())
    ours = bench_ours(model_path, strategy, prompt_tokens, decode_tokens, chunk_len, repeats, threads)
    references = []
    if compare_reference:
        for ref_strategy in reference_strategy or reference_strategies(strategy, ours.version):
            references.append(bench_reference(model_path, ref_strategy, prompt_tokens, decode_tokens, chunk_len,
                                              repeats, threads))
    if as_json:
        click.echo(json.dumps({"ours": ours.to_dict(), "reference": [r.to_dict() for r in references]}, indent=1))
        raise SystemExit(1 if any(r.error for r in references) else 0)
    click.echo(f"model {model_path} (v{ours.version}), prompt {prompt_tokens} tokens in chunks of {chunk_len}, "
               f"{decode_tokens} decode tokens, {ours.threads} threads, best of {repeats}")
    click.echo(format_result(ours))
    for ref in references:
        click.echo(format_result(ref))
    for line in ratio_lines(ours, references):
        click.echo(line)
    if any(r.error for r in references):
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    bench.main(args=argv, prog_name="python -m rwkv_chat.benchmark")


if __name__ == "__main__":
    main()
