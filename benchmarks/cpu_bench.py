"""CPU speed and memory of rwkv-chat against the reference (rwkv==0.8.32), written to docs/benchmarks.md.

    python benchmarks/cpu_bench.py [--shapes 0.1b,0.4b] [--versions 4,5.2,6,7] [--rounds 2]
                                   [--prompt-tokens 512] [--decode-tokens 64] [--out docs/benchmarks.md]

For every version and shape it makes a random-weight model in the official layout
(`python -m rwkv_chat.testing.checkpoints`, bf16 like real files; kept in --models-dir), then runs
each strategy in a fresh process (`python -m rwkv_chat.benchmark --json`, so peak RSS belongs to
that strategy alone) and the reference's CPU strategies in its own child process. Rounds are
interleaved (ours, reference, ours, ...) and the best of all runs counts, because the machine
may be shared with other work. The table reports the ratios against the reference's best
strategy and against its `cpu fp32`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkv_chat.benchmark import BenchResult, bench_reference, reference_available  # noqa: E402

SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024)}
OURS = ["cpu fp32", "cpu bf16", "cpu fp32i8", "cpu bf16i8"]
REFERENCE = ["cpu fp32", "cpu bf16"]


def make_model(folder: Path, version: str, shape: str) -> Path:
    layers, embd = SHAPES[shape]
    path = folder / f"v{version}-{shape}.pth"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "rwkv_chat.testing.checkpoints", "--version", version,
                        "--layers", str(layers), "--embd", str(embd), str(path)], check=True, cwd=ROOT)
    return path


def run_ours(model: Path, strategy: str, args) -> BenchResult:
    cmd = [sys.executable, "-m", "rwkv_chat.benchmark", "--model", str(model), "--strategy", strategy, "--json",
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return BenchResult("rwkv-chat", strategy, str(model), error=(proc.stderr or proc.stdout).strip()[-300:])
    return BenchResult(**json.loads(proc.stdout)["ours"])


def merge(results: list[BenchResult]) -> BenchResult:
    good = [r for r in results if not r.error]
    if not good:
        return results[-1]
    best = BenchResult(**good[0].to_dict())
    best.prefill_runs = [x for r in good for x in r.prefill_runs]
    best.decode_runs = [x for r in good for x in r.decode_runs]
    best.prefill_tok_s = max(r.prefill_tok_s for r in good)
    best.decode_tok_s = max(r.decode_tok_s for r in good)
    best.ttft_s = min(r.ttft_s for r in good)
    best.peak_rss_mb = min(r.peak_rss_mb for r in good)
    best.model_rss_mb = min(r.model_rss_mb for r in good)
    return best


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        info["cores"] = f"{fields.get('CPU(s)', '?').strip()} CPUs, {fields.get('Thread(s) per core', '?').strip()} thread(s) per core"
        flags = fields.get("Flags", "")
        info["isa"] = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags.split())
    except (OSError, ValueError):
        pass
    import torch

    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    info["python"] = platform.python_version()
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def table(version: str, shape: str, ours: dict, refs: dict) -> list[str]:
    ref_good = [r for r in refs.values() if not r.error]
    best_p = max((r.prefill_tok_s for r in ref_good), default=0)
    best_d = max((r.decode_tok_s for r in ref_good), default=0)
    ref_fp32 = refs.get("cpu fp32")
    lines = [f"### v{version}, {shape} ({SHAPES[shape][0]} layers x {SHAPES[shape][1]})", "",
             "| implementation | strategy | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB | model MiB "
             "| prefill vs ref best | decode vs ref best | decode vs ref fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in (("rwkv-chat", ours), ("rwkv 0.8.32", refs)):
        for strategy, r in rows.items():
            if r.error:
                lines.append(f"| {name} | {strategy} | error: {r.error[:80]} | | | | | | | |")
                continue
            rp = f"x{r.prefill_tok_s / best_p:.2f}" if best_p else "-"
            rd = f"x{r.decode_tok_s / best_d:.2f}" if best_d else "-"
            rf = f"x{r.decode_tok_s / ref_fp32.decode_tok_s:.2f}" if ref_fp32 and not ref_fp32.error else "-"
            lines.append(f"| {name} | {strategy} | {fmt(r.prefill_tok_s)} | {fmt(r.decode_tok_s, 2)} | "
                         f"{fmt(r.ttft_s * 1000)} | {fmt(r.peak_rss_mb, 0)} | {fmt(r.model_rss_mb, 0)} | {rp} | {rd} | {rf} |")
    lines.append("")
    return lines


def summary(version, shape, ours, refs) -> dict:
    ref_good = [r for r in refs.values() if not r.error]
    good = {k: r for k, r in ours.items() if not r.error}
    if not ref_good or not good:
        return {}
    best_p = max(r.prefill_tok_s for r in ref_good)
    best_d = max(r.decode_tok_s for r in ref_good)
    out = {
        "version": version, "shape": shape,
        "decode_ratio": max(r.decode_tok_s for r in good.values()) / best_d,
        "decode_best": max(good, key=lambda k: good[k].decode_tok_s),
        "prefill_ratio": max(r.prefill_tok_s for r in good.values()) / best_p,
        "prefill_best": max(good, key=lambda k: good[k].prefill_tok_s),
    }
    if "cpu fp32" in good and "cpu fp32" in refs and not refs["cpu fp32"].error:
        out["fp32_decode_ratio"] = good["cpu fp32"].decode_tok_s / refs["cpu fp32"].decode_tok_s
    if "cpu fp32" in good:
        base_peak, base_model = good["cpu fp32"].peak_rss_mb, good["cpu fp32"].model_rss_mb
        for s in ("cpu bf16", "cpu bf16i8", "cpu fp32i8"):
            if s in good:
                out[f"peak {s}"] = good[s].peak_rss_mb / base_peak
                out[f"model {s}"] = good[s].model_rss_mb / base_model
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0.1b,0.4b")
    parser.add_argument("--versions", default="4,5.2,6,7")
    parser.add_argument("--strategies", default=",".join(OURS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best of all counts)")
    parser.add_argument("--repeats", type=int, default=2, help="runs inside each process")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--models-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rwkv-chat-bench-models"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--json-out", default=None, help="also write the raw results here")
    parser.add_argument("--append", action="store_true",
                        help="add this run's sections to the existing report instead of replacing it")
    args = parser.parse_args(argv)
    if not reference_available():
        print("note: rwkv==0.8.32 is not installed; only our numbers will be written", file=sys.stderr)

    info = machine()
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    sections, summaries, raw = [], [], []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
            model = make_model(Path(args.models_dir), version, shape)
            runs_ours = {s: [] for s in strategies}
            runs_ref = {s: [] for s in REFERENCE}
            for round_ in range(args.rounds):
                for s in strategies:
                    runs_ours[s].append(run_ours(model, s, args))
                    print(f"v{version} {shape} round {round_ + 1} ours {s}: prefill {runs_ours[s][-1].prefill_tok_s:.1f} "
                          f"decode {runs_ours[s][-1].decode_tok_s:.2f} {runs_ours[s][-1].error}", flush=True)
                if reference_available():
                    for s in REFERENCE:
                        runs_ref[s].append(bench_reference(str(model), s, args.prompt_tokens, args.decode_tokens,
                                                           256, args.repeats))
                        print(f"v{version} {shape} round {round_ + 1} reference {s}: prefill "
                              f"{runs_ref[s][-1].prefill_tok_s:.1f} decode {runs_ref[s][-1].decode_tok_s:.2f} "
                              f"{runs_ref[s][-1].error}", flush=True)
            ours = {s: merge(r) for s, r in runs_ours.items()}
            refs = {s: merge(r) for s, r in runs_ref.items() if r}
            sections += table(version, shape, ours, refs)
            summaries.append(summary(version, shape, ours, refs))
            raw.append({"version": version, "shape": shape, "ours": {k: v.to_dict() for k, v in ours.items()},
                        "reference": {k: v.to_dict() for k, v in refs.items()}})
            # written after every model, so an interrupted run still leaves its results
            finished = datetime.datetime.now().astimezone()
            write_report(Path(args.out), info, started, finished, load_before, load_average(), args, sections,
                         summaries, [s for s in args.shapes.split(",")], raw_settings(args))
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(raw, indent=1))
    print(f"wrote {args.out}")


def raw_settings(args) -> str:
    return (f"prompt {args.prompt_tokens} tokens (chunks of 256), {args.decode_tokens} decoded tokens, best of "
            f"{args.rounds} interleaved round(s) x {args.repeats} run(s)")


def write_report(path, info, started, finished, load_before, load_after, args, sections, summaries, shapes=None,
                 settings=""):
    lines = [
        "Written by `python benchmarks/cpu_bench.py` (rerun it to refresh this file). Random-weight models",
        "in the official layout (bf16 files, vocab 65536) made by `python -m rwkv_chat.testing.checkpoints`;",
        f"prompt of {args.prompt_tokens} tokens fed in chunks of 256 (TTFT = that prefill), then "
        f"{args.decode_tokens} tokens decoded one at a time.",
        "Each strategy runs in a fresh process; best of "
        f"{args.rounds} interleaved rounds x {args.repeats} runs. Peak RSS = VmHWM of the whole process "
        "(loading included, ~225 MiB of it is the Python + torch runtime); model MiB = RSS growth from "
        "before loading to after the run.",
        "",
        "## Machine",
        "",
        f"- CPU: {info.get('cpu')} ({info.get('cores')}; {info.get('isa', '')})",
        f"- torch {info.get('torch')} ({info.get('threads')} threads), Python {info.get('python')}",
        f"- date: {started:%Y-%m-%d %H:%M %Z} to {finished:%H:%M %Z}; load average before {load_before}, "
        f"after {load_after} (the machine is shared: numbers are noisy, best-of-N)",
        "",
        "## Targets",
        "",
        "| model | best decode vs ref best (target >= 2.0) | best prefill vs ref best (>= 4.0) | "
        "cpu fp32 decode vs ref cpu fp32 (>= 1.0) | peak RSS int8/fp32 (<= 0.35) | peak RSS bf16/fp32 (<= 0.55) "
        "| model RSS int8/fp32 | model RSS bf16/fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        if not s:
            continue
        mark = lambda ok: "met" if ok else "missed"
        int8_peak = min(s.get("peak cpu bf16i8", 9), s.get("peak cpu fp32i8", 9))
        int8_model = min(s.get("model cpu bf16i8", 9), s.get("model cpu fp32i8", 9))
        fp32r = s.get("fp32_decode_ratio")
        lines.append(
            f"| v{s['version']} {s['shape']} | x{s['decode_ratio']:.2f} ({s['decode_best']}) {mark(s['decode_ratio'] >= 2)} "
            f"| x{s['prefill_ratio']:.2f} ({s['prefill_best']}) {mark(s['prefill_ratio'] >= 4)} "
            f"| {'-' if fp32r is None else f'x{fp32r:.2f} ' + mark(fp32r >= 1)} "
            f"| {int8_peak:.2f} {mark(int8_peak <= 0.35)} | {s.get('peak cpu bf16', 0):.2f} {mark(s.get('peak cpu bf16', 9) <= 0.55)} "
            f"| {int8_model:.2f} | {s.get('model cpu bf16', 0):.2f} |")
    lines += ["", f"## Results: {settings}", ""] + sections
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = f"<!-- run {started.isoformat()} -->"
    blocks, notes = [], ""
    if path.exists():
        text = path.read_text()
        if "## Notes" in text:
            notes = text[text.index("## Notes"):]
            text = text[:text.index("## Notes")]
        if args.append:  # keep the other runs' blocks, replace this run's
            blocks = [b for b in re.findall(r"<!-- run [^>]* -->.*?<!-- end run -->", text, flags=re.S)
                      if not b.startswith(run_id)]
    blocks.append(run_id + "\n" + "\n".join(lines) + "\n<!-- end run -->")
    path.write_text("# CPU benchmarks\n\n" + "\n\n".join(blocks) + "\n" + (("\n" + notes) if notes else ""))

if __name__ == "__main__":
    main()
