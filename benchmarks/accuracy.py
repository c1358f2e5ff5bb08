"""Accuracy of the lossy CPU strategies against `cpu fp32` on the same random-weight model.

    python benchmarks/accuracy.py [--shapes 0.1b] [--versions 7,6] [--strategies ...] [--positions 8,32,...]

For every version and shape it makes the random-weight model of `cpu_bench.py` (same files, same
--models-dir), feeds one fixed English prompt in chunks and keeps the last-token logits at each
chunk's end (the prefill path, then one decode step at the end), for `cpu fp32` and for every
strategy. It prints, per strategy, 1 - cosine similarity (mean and worst over the positions) and
the top-1 agreement with `cpu fp32`, as a markdown table.

Random weights have no outlier channels or heavy-tailed weights, which real checkpoints have and
which hurt per-block int8/int4 scales most; treat these figures as a lower bound of the error on
a real model, and as a comparison between formats on equal terms.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_bench import SHAPES, make_model  # noqa: E402

from rwkv_chat import RWKV  # noqa: E402
from rwkv_chat.tokenizer import Tokenizer  # noqa: E402

STRATEGIES = ["cpu bf16", "cpu fp32i8", "cpu bf16i8", "cpu fp32i4", "cpu bf16i4"]
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small lamp "
    "and a notebook in which he wrote down the weather, the ships that passed and the birds that rested "
    "on the railing. Over forty years the notebook grew into a shelf of volumes, and when the harbour "
    "office finally automated the light, a young historian asked whether she might read them. She found "
    "storms that no official record mentioned, a whale that had followed a fishing boat into the bay, and "
    "on one page a single line: 'No ships tonight; the sea is a mirror and I am not lonely.' She copied "
    "it onto the first page of her thesis, and years later, when the lighthouse became a museum, the "
    "line was painted above the door so that every visitor would read it on the way in. "
) * 2


def logits_at(model: RWKV, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """[len(positions), vocab]: the last-token logits after tokens[:p] for each p (chunks in order)."""
    rows, state, start = [], None, 0
    for p in positions:
        logits, state = model.forward(tokens[start:p], state)
        rows.append(logits)
        start = p
    return torch.stack(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0.1b")
    parser.add_argument("--versions", default="7,6")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--positions", default="1,8,32,64,128,200,201",
                        help="prompt lengths whose last-token logits are compared (201 after 200: a decode step)")
    parser.add_argument("--models-dir", default="/tmp/rwkv-chat-bench-models")
    parser.add_argument("--plain-q4-0", action="store_true",
                        help="i4 scales by llama.cpp's Q4_0 rule only (max|w| / -8), to compare the rounding")
    args = parser.parse_args(argv)
    if args.plain_q4_0:
        from rwkv_chat.engine import quant
        quant._I4_CANDIDATES = (8.0,)
    positions = [int(p) for p in args.positions.split(",")]
    tokens = Tokenizer().encode(PROMPT)
    if len(tokens) < positions[-1]:
        raise SystemExit(f"the prompt has {len(tokens)} tokens, fewer than position {positions[-1]}")
    print("| model | strategy | 1 - cosine (mean) | 1 - cosine (worst) | top-1 agreement |")
    print("| --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        for version in args.versions.split(","):
            path = make_model(Path(args.models_dir), version, shape)
            reference = logits_at(RWKV(path, "cpu fp32"), tokens, positions)
            for strategy in args.strategies.split(","):
                got = logits_at(RWKV(path, strategy), tokens, positions)
                distance = 1 - torch.nn.functional.cosine_similarity(got.double(), reference.double(), dim=-1)
                top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
                print(f"| v{version} {shape} {'x'.join(map(str, SHAPES[shape]))} | `{strategy}` | "
                      f"{distance.mean().item():.2e} | {distance.max().item():.2e} | "
                      f"{top1 * len(positions):.0f}/{len(positions)} |", flush=True)


if __name__ == "__main__":
    main()
