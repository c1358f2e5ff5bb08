"""rwkv-chat next to llama.cpp on the same weights: decode and prefill speed, and accuracy.

    python benchmarks/peer_llamacpp.py --llama-cpp-dir DIR [--shapes 0.1b,0.4b] [--versions 7,6]
                                       [--rounds 3] [--threads 2] [--with-1.5b] [--work-dir DIR]

Optional: nothing in the package or its tests needs it. It needs `llama-cpp-python` (the llama.cpp
library and its Python bindings) and a llama.cpp source folder for its converter
(`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`). Keep them out of the interpreter rwkv-chat
runs in, for instance:

    python -m venv ~/venv-peer --system-site-packages      # sees torch and rwkv-chat
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp   # DIR = .../vendor/llama.cpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" ~/venv-peer/bin/pip install /tmp/lcp/llama_cpp_python-0.3.36.tar.gz
    ~/venv-peer/bin/pip install "transformers==4.57.6" sentencepiece pyyaml tqdm   # the converter's needs
    ~/venv-peer/bin/python benchmarks/peer_llamacpp.py --llama-cpp-dir /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp

(a native build takes 15-30 minutes on two cores; `GGML_NATIVE=ON` compiles for this CPU).

What it does: for every version (v7, v6) and shape it makes a random-weight checkpoint in the
official layout (`rwkv_chat.testing.checkpoints`, bf16 like released files), writes it as an
HF-style folder (config.json, model.safetensors with the BlinkDL tensor names under
`model.layers.N.attention.*` / `feed_forward.*` for v7, `rwkv.blocks.N.*` for v6, the world vocab)
and converts that with llama.cpp's own `convert_hf_to_gguf.py` to F32 and BF16, then quantizes the
F32 file with llama.cpp's quantizer to Q8_0 and Q4_0 (which keeps the head at Q6_K, as
`llama-quantize` does). Each engine and precision runs in a fresh child process (2 threads),
rounds interleaved (llama.cpp, rwkv-chat, llama.cpp, ...), best of the rounds:
* decode: tokens fed one at a time after a 512-token prompt, each the argmax of the last logits;
* prefill: the 512-token prompt (llama.cpp as one batch of 512, ours in chunks of 256 as the
  chat pipeline feeds it);
* accuracy: the last-token logits after a fixed prompt of 512 ids, fed in pieces ending at
  positions 0, 15, 127 and 511; 1 - cosine against ours `cpu fp32` (mean over 15, 127 and 511:
  position 0, one token from a zero state, has nearly flat logits on random weights) and the
  fraction of those positions whose top-1 token agrees with it. llama.cpp F32 shows how close the
  conversion is (~1e-6 when it is exact).
* memory: each round first measures the rate the machine reads memory at (a reduction over 1 GiB,
  best of 5), and the table gives what each decode reads per second: the matrix weights of a token
  times the bytes per weight of the precision (Q4_0's Q6_K head is counted at Q4_0's size). Decode
  is bound by that read at large shapes, and "x1.2 needs" is the share of the ceiling a decode 1.2
  times llama.cpp's would have to read. On a shared machine the rate moves from minute to minute
  (a decode may read faster than the round's probe), so near or over 100% is evidence of the
  memory limit, not a bound.
Pairs: `cpu fp32` / F32, `cpu bf16` / BF16, `cpu bf16i8` and `cpu fp32i8` / Q8_0, `cpu bf16i4` /
Q4_0 (skipped when this rwkv-chat does not know the strategy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048)}
# (llama.cpp file type, our strategies compared with it)
PAIRS = [("F32", ["cpu fp32"]), ("BF16", ["cpu bf16"]), ("Q8_0", ["cpu bf16i8", "cpu fp32i8"]),
         ("Q4_0", ["cpu bf16i4"])]
POSITIONS = (0, 15, 127, 511)  # the accuracy prompt is cut after these tokens


# ---------------------------------------------------------------------------------------------
# Checkpoints -> GGUF


def _hf_name(version: str, key: str) -> str:
    """The name llama.cpp's converter expects for an official (BlinkDL) key."""
    block = "model.layers" if version == "7" else "rwkv.blocks"
    top = {"emb.weight": "embeddings.weight", "ln_out.weight": "ln_out.weight", "ln_out.bias": "ln_out.bias"}
    if key.startswith("head."):
        return key
    if key in top:
        return ("model." if version == "7" else "rwkv.") + top[key]
    if key.startswith("blocks.0.ln0."):
        return ("model.pre_ln." if version == "7" else "rwkv.blocks.0.pre_ln.") + key.rsplit(".", 1)[1]
    _, layer, rest = key.split(".", 2)
    rest = rest.replace("att.", "attention.", 1).replace("ffn.", "feed_forward.", 1)
    return f"{block}.{layer}.{rest}"


def hf_folder(version: str, layers: int, embd: int, folder: Path) -> Path:
    """Our random checkpoint (seed 0) as an HF-style folder for convert_hf_to_gguf.py."""
    import torch
    from safetensors.torch import save_file

    from rwkv_chat.testing.checkpoints import default_ffn_dim, default_lora_dims, make_checkpoint

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sd = make_checkpoint(version, layers, embd, dtype=torch.bfloat16)
    lora = default_lora_dims(version, embd)
    config = {"architectures": [f"Rwkv{version}ForCausalLM"], "hidden_size": embd, "num_hidden_layers": layers,
              "head_size": 64, "layer_norm_epsilon": 1e-5, "intermediate_size": default_ffn_dim(version, embd),
              "vocab_size": sd["emb.weight"].shape[0], "rescale_every": 0}
    if version == "7":
        config |= {"lora_rank_decay": lora["w"], "lora_rank_iclr": lora["a"],
                   "lora_rank_value_residual_mix": lora["v"], "lora_rank_gate": lora["g"]}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({_hf_name(version, k): v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    shutil.copy(ROOT / "rwkv_chat" / "data" / "rwkv_vocab_v20230424.txt", folder)
    return folder


def make_models(version: str, shape: str, work: Path, llama_dir: Path) -> dict[str, Path]:
    """{"pth": our checkpoint, "F32"/"BF16"/"Q8_0"/"Q4_0": GGUF files}; made once, kept in `work`."""
    import torch

    from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

    layers, embd = SHAPES[shape]
    stem = f"v{version}-{shape}"
    files = {"pth": work / f"{stem}.pth"}
    if not files["pth"].exists():
        save_checkpoint(files["pth"], make_checkpoint(version, layers, embd, dtype=torch.bfloat16))
    for kind in ("F32", "BF16"):
        files[kind] = work / f"{stem}-{kind}.gguf"
        if not files[kind].exists():
            folder = hf_folder(version, layers, embd, work / f"{stem}-hf")
            subprocess.run([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                            kind.lower(), "--outfile", str(files[kind])], check=True, cwd=llama_dir,
                           stdout=subprocess.DEVNULL)
    import llama_cpp

    for kind, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        files[kind] = work / f"{stem}-{kind}.gguf"
        if not files[kind].exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(files["F32"]).encode(), str(files[kind]).encode(),
                                              ctypes_pointer(params)) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {files['F32']} to {kind}")
    return files


def ctypes_pointer(params):
    import ctypes

    return ctypes.pointer(params)


# ---------------------------------------------------------------------------------------------
# Children: one engine, one file, one precision; prints a JSON line


def accuracy_pieces(prompt: list[int]) -> list[list[int]]:
    cuts = [0, *[p + 1 for p in POSITIONS]]
    return [prompt[a:b] for a, b in zip(cuts, cuts[1:])]


def child_ours(model: str, strategy: str, args) -> dict:
    import torch

    from rwkv_chat.benchmark import bench_ours, prompt_ids
    from rwkv_chat.engine import RWKV

    torch.set_num_threads(args.threads)
    result = bench_ours(model, strategy, prompt_tokens=512, decode_tokens=args.decode_tokens, repeats=2,
                        threads=args.threads)
    if result.error:
        return {"error": result.error}
    out = {"decode": result.decode_tok_s, "prefill": result.prefill_tok_s}
    if args.logits_out:
        rwkv = RWKV(model, strategy)
        state, rows = None, []
        for piece in accuracy_pieces(prompt_ids(512, rwkv.vocab_size, seed=1)):
            logits, state = rwkv.forward(piece, state)
            rows.append(logits.float())
        torch.save(torch.stack(rows), args.logits_out)
    return out


def child_ceiling(args) -> dict:
    """The rate this machine reads memory at right now: the best of 5 reductions over 1 GiB (torch's
    amax streams at the speed of a plain C loop over the same bytes), on the benchmark's threads."""
    import torch

    torch.set_num_threads(args.threads)
    data = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.amax()
        best = min(best, time.perf_counter() - start)
    return {"read_gb_s": data.numel() * 4 / best / 1e9}


# bytes per weight as llama.cpp stores each type (Q8_0: 32 int8 + an fp16 scale; Q4_0: 32 nibbles + one);
# our int8 / int4 formats have the same sizes
BYTES_PER_WEIGHT = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}


def weights_read_per_token(checkpoint: Path) -> int:
    """How many matrix weights a decode step reads: every 2-D tensor but the embedding (one row of it)."""
    import torch

    sd = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    return sum(t.numel() for k, t in sd.items() if t.dim() == 2 and k != "emb.weight")


_QUIET = None


def child_llama(model: str, args) -> dict:
    import ctypes

    import llama_cpp
    import numpy as np

    from rwkv_chat.benchmark import prompt_ids

    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp calls it
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mdl = llama_cpp.llama_model_load_from_file(model.encode(), mparams)
    if not mdl:
        return {"error": f"llama.cpp could not load {model}"}
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 4096, 512, 512
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(mdl, cparams)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(mdl))

    def forward(tokens, state):
        if state is None:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return logits, True

    from rwkv_chat.benchmark import _timed_runs

    prompt = prompt_ids(512, n_vocab)
    forward(prompt[:8], None)
    prefill, decode = _timed_runs(forward, prompt, args.decode_tokens, 512, 2)
    out = {"decode": args.decode_tokens / min(decode), "prefill": 512 / min(prefill)}
    if args.logits_out:
        import torch

        state, rows = None, []
        for piece in accuracy_pieces(prompt_ids(512, n_vocab, seed=1)):
            logits, state = forward(piece, state)
            rows.append(torch.from_numpy(logits.copy()))
        torch.save(torch.stack(rows), args.logits_out)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(mdl)
    return out


def run_child(engine: str, model: Path, what: str, args, logits_out: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", str(model), "--strategy", what,
           "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
    if logits_out is not None:
        cmd += ["--logits-out", str(logits_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip()[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def strategy_known(strategy: str) -> bool:
    from rwkv_chat.engine.strategy import parse_strategy

    try:
        parse_strategy(strategy)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The table


def accuracy(logits_file: Path, reference_file: Path) -> tuple[float, float] | None:
    import torch

    if not (logits_file.exists() and reference_file.exists()):
        return None
    # row 0 (the first token from a zero state) is left out: on random weights its logits are
    # nearly flat, so its cosine swings with any rounding and would dominate the mean
    got, ref = torch.load(logits_file).double()[1:], torch.load(reference_file).double()[1:]
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    agree = (got.argmax(-1) == ref.argmax(-1)).double().mean()
    return float((1 - cosine).mean()), float(agree)


def fmt_acc(acc) -> str:
    return "-" if acc is None else f"{acc[0]:.1e} / {acc[1] * 100:.0f}%"


def bench_model(version: str, shape: str, args, work: Path, llama_dir: Path) -> list[str]:
    files = make_models(version, shape, work, llama_dir)
    layers, embd = SHAPES[shape]
    rows: dict[tuple[str, str], dict] = {}
    jobs = []  # (engine, model file, what, key)
    for kind, ours in PAIRS:
        if kind not in args.precisions:
            continue
        jobs.append(("llama", files[kind], kind, ("llama.cpp", kind)))
        for strategy in ours:
            if strategy_known(strategy):
                jobs.append(("ours", files["pth"], strategy, ("rwkv-chat", strategy)))
    logits = lambda key: work / f"logits-v{version}-{shape}-{key[0]}-{key[1].replace(' ', '_')}.pt"
    ceiling = 0.0
    for round_ in range(args.rounds):
        out = run_child("ceiling", files["pth"], "", args, None)
        ceiling = max(ceiling, out.get("read_gb_s", 0.0))
        for engine, model, what, key in jobs:
            out = run_child(engine, model, what, args, logits(key) if round_ == 0 else None)
            best = rows.setdefault(key, {"decode": 0.0, "prefill": 0.0})
            if "error" in out:
                best.setdefault("error", out["error"])
                print(f"  {key}: {out['error']}", file=sys.stderr)
                continue
            best["decode"], best["prefill"] = max(best["decode"], out["decode"]), max(best["prefill"], out["prefill"])
            print(f"  v{version} {shape} round {round_ + 1} {key[0]} {what}: decode {out['decode']:.1f} "
                  f"prefill {out['prefill']:.0f} tok/s", file=sys.stderr, flush=True)
    reference = logits(("rwkv-chat", "cpu fp32"))
    weights = weights_read_per_token(files["pth"])
    lines = [f"### v{version}, {shape} ({layers} layers x {embd})", "",
             f"Memory read ceiling {ceiling:.1f} GB/s (best of the rounds). Read at decode: the {weights / 1e6:,.0f}M "
             "matrix weights a token reads, at the precision's bytes per weight, times tokens per second; "
             "x1.2 needs: the share of the ceiling that 1.2 times llama.cpp's decode would read.", "",
             "| engine | precision | decode tok/s | prefill tok/s | decode ours / llama.cpp | prefill ours / llama.cpp "
             "| 1 - cosine / top-1 vs ours fp32 | read at decode GB/s | x1.2 needs |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    read = lambda kind, tok_s: tok_s * weights * BYTES_PER_WEIGHT[kind] / 1e9
    for kind, ours in PAIRS:
        peer = rows.get(("llama.cpp", kind))
        if peer is None:
            continue
        size = files[kind].stat().st_size / 2**20
        need = f"{read(kind, 1.2 * peer['decode']) / ceiling * 100:.0f}%" if ceiling else "-"
        lines.append(f"| llama.cpp | {kind} ({size:,.0f} MiB) | {peer['decode']:.1f} | {peer['prefill']:.0f} | | | "
                     f"{fmt_acc(accuracy(logits(('llama.cpp', kind)), reference))} | "
                     f"{read(kind, peer['decode']):.1f} | {need} |")
        for strategy in ours:
            mine = rows.get(("rwkv-chat", strategy))
            if mine is None:
                continue
            ratio = lambda a, b: f"x{a / b:.2f}" if a and b else "-"
            lines.append(f"| rwkv-chat | `{strategy}` | {mine['decode']:.1f} | {mine['prefill']:.0f} | "
                         f"{ratio(mine['decode'], peer['decode'])} | {ratio(mine['prefill'], peer['prefill'])} | "
                         f"{'(reference)' if strategy == 'cpu fp32' else fmt_acc(accuracy(logits(('rwkv-chat', strategy)), reference))} | "
                         f"{read(kind, mine['decode']):.1f} | |")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp-dir", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                        help="llama.cpp source folder holding convert_hf_to_gguf.py (or LLAMA_CPP_DIR)")
    parser.add_argument("--shapes", default="0.1b,0.4b")
    parser.add_argument("--with-1.5b", dest="big", action="store_true", help="add the 1.5B shape (24 x 2048)")
    parser.add_argument("--versions", default="7,6")
    parser.add_argument("--precisions", default="F32,BF16,Q8_0,Q4_0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "rwkv-chat-peer")
    parser.add_argument("--child", choices=["ours", "llama", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        children = {"ours": lambda: child_ours(args.model, args.strategy, args),
                    "llama": lambda: child_llama(args.model, args), "ceiling": lambda: child_ceiling(args)}
        out = children[args.child]()
        print("RESULT " + json.dumps(out))
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed in this interpreter (see the top of this file)")
    if args.llama_cpp_dir is None or not (Path(args.llama_cpp_dir) / "convert_hf_to_gguf.py").is_file():
        sys.exit("--llama-cpp-dir must name a llama.cpp source folder holding convert_hf_to_gguf.py")
    args.precisions = args.precisions.split(",")
    shapes = args.shapes.split(",") + (["1.5b"] if args.big else [])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = []
    for version in args.versions.split(","):
        for shape in shapes:
            lines += bench_model(version, shape, args, args.work_dir, Path(args.llama_cpp_dir))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"rwkv-chat vs llama.cpp (llama-cpp-python {llama_cpp_version()}), {args.threads} threads, "
          f"{platform.machine()}, started {start}, load average after {load}; best of {args.rounds} interleaved "
          f"rounds; decode after a 512-token prompt, {args.decode_tokens} tokens\n")
    print("\n".join(lines))


def llama_cpp_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


if __name__ == "__main__":
    main()
