#!/usr/bin/env python
"""Train the embedded demo model (rwkv_chat/data/demo/) from scratch, reproducibly.

    pip install chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3 pyyaml   # dev-only corpora
    python scripts/train_demo_model.py                                     # defaults = shipped model

Steps: prepare the corpus (rwkv_chat.training.data), train a small RWKV-7 over the corpus's local
vocabulary (rwkv_chat.training.rwkv7) with AdamW + warmup + cosine LR + gradient clipping, then
write the compact model file (bf16 safetensors, local vocabulary + world-id map + metadata) that
rwkv_chat.demo expands into an official 65536-row checkpoint on first use.
Everything is seeded; with the same torch version and thread count the run is repeatable.
`--tiny` runs a seconds-long smoke test of the whole pipeline (writes to /tmp by default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rwkv_chat.training.data import PreparedData, prepare
from rwkv_chat.demo import COMPACT_NAME, save_compact
from rwkv_chat.training.rwkv7 import RWKV7, RWKV7Config

PROMPTS = [
    "Hi!",
    "How are you doing today?",
    "What do you like to do for fun?",
    "What is your favorite food?",
    "Do you have any pets?",
    "Where are you from?",
    "I'm feeling a bit tired today.",
    "Tell me a joke.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256, help="context length (multiple of 16)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--min-count", type=int, default=12, help="vocabulary: keep tokens seen this often")
    p.add_argument("--chatterbot-repeat", type=int, default=3, help="copies of ChatterBot's train set")
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="CPU autocast for matmuls")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-tokens", type=int, default=32768, help="val tokens per evaluation")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--data", type=Path, default=None, help="cache of the prepared token file")
    p.add_argument("--out", type=Path, default=None, help="output folder (default rwkv_chat/data/demo)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke test of the pipeline")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.ctx, args.n_layer, args.n_embd = 20, 2, 64, 2, 64
        args.head_size, args.eval_every, args.eval_tokens, args.warmup = 32, 10, 2048, 5
        args.out = args.out or Path("/tmp/rwkv-demo-tiny")
    args.out = args.out or ROOT / "rwkv_chat" / "data" / "demo"
    if args.ctx % 16:
        p.error("--ctx must be a multiple of 16")
    return args


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(stream: torch.Tensor, batch: int, ctx: int, seed: int):
    """Endless [batch, ctx + 1] windows: the stream cut into ctx+1 windows, a seeded shuffle of
    them per epoch (a fresh random offset each epoch so window borders move)."""
    g = torch.Generator().manual_seed(seed)
    stream = stream.long()
    while True:
        offset = int(torch.randint(0, ctx, (1,), generator=g))
        n = (stream.numel() - offset) // (ctx + 1)
        windows = stream[offset : offset + n * (ctx + 1)].view(n, ctx + 1)
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield windows[order[i : i + batch]]


@torch.no_grad()
def evaluate(model: RWKV7, stream: torch.Tensor, ctx: int, max_tokens: int, amp: bool) -> float:
    model.eval()
    n = min(stream.numel() - 1, max_tokens) // ctx
    windows = stream[: n * ctx + 1].long()
    x = windows[:-1].view(n, ctx)
    y = windows[1:].view(n, ctx)
    total = 0.0
    for i in range(0, n, 8):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            total += model.loss(x[i : i + 8], y[i : i + 8]).item() * x[i : i + 8].shape[0]
    model.train()
    return total / n


@torch.no_grad()
def reply(model: RWKV7, tokenizer, token_ids: torch.Tensor, message: str, max_tokens: int = 40) -> str:
    """Greedy reply to one user message (re-runs the whole prompt per token: fine for tests)."""
    local = {int(t): i for i, t in enumerate(token_ids)}
    world = tokenizer.encode(f"User: {message}\n\nAssistant:")
    ids = [local.get(t) for t in world]
    if any(i is None for i in ids):  # a token outside the demo vocabulary: spell it in pieces
        from rwkv_chat.training.data import restrict_tokens

        world = restrict_tokens(world, set(local), tokenizer)
        ids = [local[t] for t in world]
    model.eval()
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids + out]))[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        text = tokenizer.decode(int(token_ids[i]) for i in out)
        if "\n\n" in text:
            break
    model.train()
    return tokenizer.decode(int(token_ids[i]) for i in out).split("\n\n")[0].strip()


def unigram_loss(stream: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(stream.long(), minlength=vocab).double() + 0.5
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)
    from rwkv_chat.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    t0 = time.time()
    if args.data is not None and args.data.exists():
        data = PreparedData.load(args.data)
        wanted = {"seed": args.seed, "min_count": args.min_count, "chatterbot_repeat": args.chatterbot_repeat}
        if any(data.meta.get(k) != v for k, v in wanted.items()):
            data = None
    else:
        data = None
    if data is None:
        data = prepare(
            seed=args.seed, min_count=args.min_count, chatterbot_repeat=args.chatterbot_repeat, tokenizer=tokenizer
        )
        if args.data is not None:
            args.data.parent.mkdir(parents=True, exist_ok=True)
            data.save(args.data)
    print(f"data: {json.dumps(data.meta)} ({time.time() - t0:.1f}s)", flush=True)
    vocab = int(data.token_ids.numel())
    print(f"unigram entropy of train stream: {unigram_loss(data.train, vocab):.3f} nats", flush=True)

    cfg = RWKV7Config(
        vocab_size=vocab, n_embd=args.n_embd, n_layer=args.n_layer, head_size=args.head_size,
        dim_w=32, dim_a=32, dim_v=16, dim_g=64,
    )
    model = RWKV7(cfg, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_body = n_params - model.emb.weight.numel() - model.head.weight.numel()
    print(f"model: {cfg.to_dict()} params {n_params:,} (non-embedding {n_body:,})", flush=True)
    opt = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    amp = args.amp == "bf16"
    it = batches(data.train, args.batch, args.ctx, args.seed + 1)

    history = []
    t_start = time.time()
    smooth = None
    val = None
    for step in range(args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        xy = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(xy[:, :-1], xy[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        value = loss.item()
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - t_start
            tps = (step + 1) * args.batch * args.ctx / elapsed
            print(
                f"step {step:5d} loss {value:.4f} (avg {smooth:.4f}) lr {lr:.2e} gnorm {gnorm:.2f} "
                f"{tps:.0f} tok/s {elapsed / 60:.1f} min",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val = evaluate(model, data.val, args.ctx, args.eval_tokens, amp)
            history.append({"step": step + 1, "train_avg": round(smooth, 4), "val": round(val, 4)})
            print(f"  eval step {step + 1}: val loss {val:.4f}", flush=True)
            print(f"  sample: User: Hi! -> {reply(model, tokenizer, data.token_ids, 'Hi!')!r}", flush=True)

    minutes = (time.time() - t_start) / 60
    final_train = evaluate(model, data.train, args.ctx, args.eval_tokens, amp)
    print(f"final: train loss {final_train:.4f} val loss {val:.4f} ({minutes:.1f} min)", flush=True)

    meta = {
        "config": cfg.to_dict(),
        "data": data.meta,
        "train": {
            "steps": args.steps, "batch": args.batch, "ctx": args.ctx, "lr": args.lr,
            "min_lr": args.min_lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
            "clip": args.clip, "amp": args.amp, "seed": args.seed, "threads": args.threads,
            "minutes": round(minutes, 1), "torch": torch.__version__,
        },
        "final_train_loss": round(final_train, 4),
        "final_val_loss": round(val, 4),
        "history": history,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / COMPACT_NAME
    save_compact(path, model.export(torch.bfloat16), data.token_ids, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    (args.out / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")

    for prompt in PROMPTS:
        print(f"User: {prompt}\nAssistant: {reply(model, tokenizer, data.token_ids, prompt)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
