"""Random-weight RWKV checkpoints in the official key layout, for tests and benchmarks.

The generated dicts use the exact key names, shapes and key order of the official RWKV world
checkpoints (v4, v5.2, v6, v7), so any loader that reads a real `.pth` reads these too. The
weights are random but scaled like trained weights, so that every parameter family and the token
history move the logits measurably:

* decays (v4 `time_decay`, v5.2/v6 `time_decay`, v7 `w0`) spread every head's channels between
  fast and slow (a random permutation of a ramp, plus noise);
* token-shift mixes (`time_mix_*`, `time_maa_*`, `x_*`) lie in (0.05, 0.95);
* v7's `a` gate stays away from 0 and 1, `k_k`/`k_a` near their trained range, `r_k` nonzero;
* layer-norm weights are ~1 with noise, biases small;
* linear weights are N(0, gain/sqrt(fan_in)); output projections use a gain below 1;
* the head makes logits with a standard deviation of a few units.

Everything is drawn from one seeded `torch.Generator` in a fixed order, so a (version, shape,
seed) triple always gives the same tensors. Tensors are generated in float32 and cast to `dtype`.

Command line (benchmarks use it):

    python -m rwkv_chat.testing.checkpoints --version 7 --layers 12 --embd 768 out.pth
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..files import write_atomically

VERSIONS = ("4", "5.2", "6", "7")

# The LoRA dimensions each version accepts in `lora_dims`.
LORA_NAMES = {"4": (), "5.2": (), "6": ("maa", "decay"), "7": ("w", "a", "v", "g")}

TIME_STATE_KEY = "blocks.{layer}.att.time_state"


# ---------------------------------------------------------------------------------------------
# Shapes


def _check_version(version: str) -> str:
    if not isinstance(version, str) or version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)} (a string), got {version!r}")
    return version


def default_ffn_dim(version: str, n_embd: int) -> int:
    """FFN width of the official models: 4*C for v4 and v7, 3.5*C rounded down to 32 for v5.2/v6."""
    _check_version(version)
    if version in ("5.2", "6"):
        return int(n_embd * 3.5) // 32 * 32
    return 4 * n_embd


def default_lora_dims(version: str, n_embd: int) -> dict[str, int]:
    """LoRA widths of the official models, scaled down for tiny widths.

    v6: time_maa 32 and time_decay 64 (doubled from C = 4096), capped at C/2 (at least 8).
    v7: the official rule, max(32, round(f(C) / 32) * 32) with f = 1.8*sqrt(C) for w and a,
    1.3*sqrt(C) for v and 0.6*C**0.8 for g (g at most 128 up to C=1024, as released):
    64/64/32/128 at C=768 and 1024, 96/96/64/256 at 2048, 96/96/64/320 at 2560.
    """
    _check_version(version)
    if version == "6":
        factor = 2 if n_embd >= 4096 else 1
        cap = max(8, n_embd // 2)
        return {"maa": min(32 * factor, cap), "decay": min(64 * factor, cap)}
    if version == "7":
        def rounded(value: float) -> int:
            return max(32, int(round(value / 32)) * 32)

        gate = rounded(0.6 * n_embd**0.8)
        if n_embd <= 1024:
            gate = min(gate, 128)  # the released 0.1B/0.4B use 128 (the rule gives 160 at C=1024)
        return {
            "w": rounded(1.8 * n_embd**0.5),
            "a": rounded(1.8 * n_embd**0.5),
            "v": rounded(1.3 * n_embd**0.5),
            "g": gate,
        }
    return {}


def _resolve_lora_dims(version: str, n_embd: int, overrides: dict | None) -> dict[str, int]:
    dims = default_lora_dims(version, n_embd)
    for name, value in (overrides or {}).items():
        if name not in LORA_NAMES[version]:
            allowed = ", ".join(LORA_NAMES[version]) or "none"
            raise ValueError(f"v{version} has no LoRA named {name!r} (allowed: {allowed})")
        if int(value) < 1:
            raise ValueError(f"LoRA dimension {name!r} must be positive, got {value!r}")
        dims[name] = int(value)
    return dims


# ---------------------------------------------------------------------------------------------
# Random tensors


class _Draw:
    """Seeded float32 tensor factory; each method documents the distribution it draws."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def normal(self, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).mul_(std).add_(mean)

    def uniform(self, shape, low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).mul_(high - low).add_(low)

    def linear(self, n_out: int, n_in: int, gain: float = 1.0) -> torch.Tensor:
        """A weight stored [out, in], N(0, gain / sqrt(in)): keeps unit-scale activations unit-scale."""
        return self.normal((n_out, n_in), gain / math.sqrt(n_in))

    def mix(self, n_embd: int) -> torch.Tensor:
        """A token-shift mix [1, 1, C] in (0.05, 0.95): both the current and previous token count."""
        return self.uniform((1, 1, n_embd), 0.05, 0.95)

    def spread(self, n: int, low: float, high: float, noise: float = 0.1) -> torch.Tensor:
        """n values ramped from low to high, randomly permuted (so every head gets fast and slow
        channels), plus a little noise."""
        ramp = torch.linspace(low, high, n)
        order = torch.randperm(n, generator=self.generator)
        return ramp[order] + self.normal((n,), noise)

    def ln(self, prefix: str, n: int, out: dict) -> None:
        """A layer norm: weight ~1 with noise, bias small."""
        out[prefix + ".weight"] = self.normal((n,), 0.1, mean=1.0)
        out[prefix + ".bias"] = self.normal((n,), 0.05)


# ---------------------------------------------------------------------------------------------
# Per-version blocks (keys in the official order)

_OUTPUT_GAIN = 0.5  # att.output / ffn.value: residual updates smaller than the residual itself


def _v4_block(d: _Draw, p: str, C: int, F: int, out: dict) -> None:
    # v4 wkv works in log space: per-step decay is exp(-exp(time_decay)), so -6..2 spans
    # "remember ~400 tokens" to "forget at once"; time_first is the bonus of the current token.
    out[p + "att.time_decay"] = d.spread(C, -6.0, 2.0, noise=0.2)
    out[p + "att.time_first"] = d.normal((C,), 0.5, mean=-0.5)
    out[p + "att.time_mix_k"] = d.mix(C)
    out[p + "att.time_mix_v"] = d.mix(C)
    out[p + "att.time_mix_r"] = d.mix(C)
    out[p + "att.key.weight"] = d.linear(C, C)
    out[p + "att.value.weight"] = d.linear(C, C)
    out[p + "att.receptance.weight"] = d.linear(C, C)
    out[p + "att.output.weight"] = d.linear(C, C, _OUTPUT_GAIN)
    _v4_v5_ffn(d, p, C, F, "time_mix", out)


def _v4_v5_ffn(d: _Draw, p: str, C: int, F: int, mix_name: str, out: dict) -> None:
    out[p + f"ffn.{mix_name}_k"] = d.mix(C)
    out[p + f"ffn.{mix_name}_r"] = d.mix(C)
    out[p + "ffn.key.weight"] = d.linear(F, C)
    out[p + "ffn.receptance.weight"] = d.linear(C, C)
    out[p + "ffn.value.weight"] = d.linear(C, F, _OUTPUT_GAIN)


def _head_decays(d: _Draw, H: int, N: int, low: float, high: float) -> torch.Tensor:
    # v5.2/v6 per-step decay is exp(-exp(time_decay)): -6 -> 0.9975 (slow), 1 -> 0.066 (fast)
    return d.spread(H * N, low, high, noise=0.2).reshape(H, N)


def _v5_v6_attention_tail(d: _Draw, p: str, C: int, out: dict) -> None:
    out[p + "att.receptance.weight"] = d.linear(C, C)
    out[p + "att.key.weight"] = d.linear(C, C)
    out[p + "att.value.weight"] = d.linear(C, C)
    out[p + "att.output.weight"] = d.linear(C, C, _OUTPUT_GAIN)
    out[p + "att.gate.weight"] = d.linear(C, C)
    d.ln(p + "att.ln_x", C, out)


def _v5_2_block(d: _Draw, p: str, C: int, H: int, N: int, F: int, out: dict) -> None:
    for name in ("k", "v", "r", "g"):
        out[p + f"att.time_mix_{name}"] = d.mix(C)
    out[p + "att.time_decay"] = _head_decays(d, H, N, -6.0, 1.0)
    out[p + "att.time_faaaa"] = d.normal((H, N), 0.4, mean=0.4)
    _v5_v6_attention_tail(d, p, C, out)
    _v4_v5_ffn(d, p, C, F, "time_mix", out)


def _v6_block(d: _Draw, p: str, C: int, H: int, N: int, F: int, lora: dict, out: dict) -> None:
    D, Dd = lora["maa"], lora["decay"]
    for name in ("x", "w", "k", "v", "r", "g"):
        out[p + f"att.time_maa_{name}"] = d.mix(C)
    # data-dependent mix offsets: tanh(x @ w1) is O(1), w2 turns it into offsets of ~0.2
    out[p + "att.time_maa_w1"] = d.normal((C, 5 * D), 1 / math.sqrt(C))
    out[p + "att.time_maa_w2"] = d.normal((5, D, C), 0.3 / math.sqrt(D))
    out[p + "att.time_decay"] = _head_decays(d, H, N, -6.0, 1.0).reshape(1, 1, C)
    out[p + "att.time_decay_w1"] = d.normal((C, Dd), 1 / math.sqrt(C))
    # data-dependent decay: the LoRA moves time_decay by ~1 (trained v6 decays vary a lot)
    out[p + "att.time_decay_w2"] = d.normal((Dd, C), 1.5 / math.sqrt(Dd))
    out[p + "att.time_faaaa"] = d.normal((H, N), 0.4, mean=0.4)
    _v5_v6_attention_tail(d, p, C, out)
    _v4_v5_ffn(d, p, C, F, "time_maa", out)


def _v7_block(d: _Draw, p: str, C: int, H: int, N: int, F: int, lora: dict, out: dict) -> None:
    Dw, Da, Dv, Dg = lora["w"], lora["a"], lora["v"], lora["g"]
    for name in ("r", "w", "k", "v", "a", "g"):
        out[p + f"att.x_{name}"] = d.mix(C)
    # decay exp(-e^-0.5 * sigmoid(w0 + lora)): w0 -6.5 -> 0.999 per step, 1.5 -> 0.60
    out[p + "att.w0"] = d.spread(C, -6.5, 1.5, noise=0.2).reshape(1, 1, C)
    out[p + "att.w1"] = d.normal((C, Dw), 1 / math.sqrt(C))
    out[p + "att.w2"] = d.normal((Dw, C), 1.5 / math.sqrt(Dw))  # LoRA moves w0 by ~1
    # in-context learning rate a = sigmoid(a0 + x@a1@a2): mostly within (0.2, 0.8)
    out[p + "att.a0"] = d.normal((1, 1, C), 0.5)
    out[p + "att.a1"] = d.normal((C, Da), 1 / math.sqrt(C))
    out[p + "att.a2"] = d.normal((Da, C), 0.5 / math.sqrt(Da))
    # value residual gate (unused in layer 0, present there like in the real files)
    out[p + "att.v0"] = d.normal((1, 1, C), 0.5, mean=0.5)
    out[p + "att.v1"] = d.normal((C, Dv), 1 / math.sqrt(C))
    out[p + "att.v2"] = d.normal((Dv, C), 0.5 / math.sqrt(Dv))
    # output gate sigmoid(x@g1)@g2: sigmoid outputs have mean square ~0.29, so g ~ unit scale
    out[p + "att.g1"] = d.normal((C, Dg), 1 / math.sqrt(C))
    out[p + "att.g2"] = d.normal((Dg, C), 1 / math.sqrt(0.29 * Dg))
    out[p + "att.k_k"] = d.uniform((1, 1, C), 0.5, 1.2)
    out[p + "att.k_a"] = d.uniform((1, 1, C), 0.4, 1.2)
    out[p + "att.r_k"] = d.normal((H, N), 0.2)
    out[p + "att.receptance.weight"] = d.linear(C, C)
    out[p + "att.key.weight"] = d.linear(C, C)
    out[p + "att.value.weight"] = d.linear(C, C)
    out[p + "att.output.weight"] = d.linear(C, C, _OUTPUT_GAIN)
    d.ln(p + "att.ln_x", C, out)
    out[p + "ffn.x_k"] = d.mix(C)
    out[p + "ffn.key.weight"] = d.linear(F, C)
    out[p + "ffn.value.weight"] = d.linear(C, F, _OUTPUT_GAIN)


# ---------------------------------------------------------------------------------------------
# Public API


def make_checkpoint(
    version: str,
    n_layer: int,
    n_embd: int,
    *,
    head_size: int = 64,
    vocab_size: int = 65536,
    ffn_dim: int | None = None,
    lora_dims: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A random-weight checkpoint dict in the official layout of RWKV `version` ("4", "5.2",
    "6" or "7"). `head_size` must divide `n_embd` (ignored by v4, which has no heads).
    `ffn_dim` defaults to `default_ffn_dim`, `lora_dims` overrides entries of
    `default_lora_dims` (v6: "maa", "decay"; v7: "w", "a", "v", "g")."""
    _check_version(version)
    if n_layer < 1 or n_embd < 1 or vocab_size < 1:
        raise ValueError(f"n_layer, n_embd and vocab_size must be positive, got {n_layer}, {n_embd}, {vocab_size}")
    if version != "4" and (head_size < 1 or n_embd % head_size):
        raise ValueError(f"head_size {head_size} does not divide n_embd {n_embd}")
    C = n_embd
    N = head_size
    H = C // N
    F = default_ffn_dim(version, C) if ffn_dim is None else int(ffn_dim)
    lora = _resolve_lora_dims(version, C, lora_dims)
    d = _Draw(seed)

    out: dict[str, torch.Tensor] = {}
    # Embedding: layer-normed by blocks.0.ln0 before use, so its scale only needs to stay
    # well above the layer norm's eps.
    out["emb.weight"] = d.normal((vocab_size, C), 0.1)
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        d.ln(p + "ln1", C, out)
        d.ln(p + "ln2", C, out)
        if layer == 0:
            d.ln(p + "ln0", C, out)
        if version == "4":
            _v4_block(d, p, C, F, out)
        elif version == "5.2":
            _v5_2_block(d, p, C, H, N, F, out)
        elif version == "6":
            _v6_block(d, p, C, H, N, F, lora, out)
        else:
            _v7_block(d, p, C, H, N, F, lora, out)
    d.ln("ln_out", C, out)
    # logits = head @ (unit-scale vector): std ~ 2.5
    out["head.weight"] = d.linear(vocab_size, C, 2.5)
    return {key: value.to(dtype).contiguous() for key, value in out.items()}


def make_state_file(
    version: str,
    n_layer: int,
    n_embd: int,
    head_size: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random tuned-state file (RWKV-PEFT "state tuning" layout): `blocks.{i}.att.time_state`,
    shape [H, N, N], stored [h][v][k], N(0, 1) entries (the size of a state after a few dozen
    tokens, so it moves the logits). v4 has no matrix state and raises ValueError."""
    _check_version(version)
    if version == "4":
        raise ValueError("RWKV v4 has no tuned-state files (its state is not a [H, N, N] matrix)")
    if head_size < 1 or n_embd % head_size:
        raise ValueError(f"head_size {head_size} does not divide n_embd {n_embd}")
    H, N = n_embd // head_size, head_size
    d = _Draw(seed)
    return {
        TIME_STATE_KEY.format(layer=layer): d.normal((H, N, N), 1.0).to(dtype).contiguous()
        for layer in range(n_layer)
    }


def merge_state(checkpoint: dict[str, torch.Tensor], state_file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new checkpoint dict with the state file's `blocks.{i}.att.time_state` keys merged in
    ("merged state"); neither input is modified. Raises ValueError on a layer count or shape
    mismatch."""
    n_layer = 1 + max(int(key.split(".")[1]) for key in checkpoint if key.startswith("blocks."))
    head_key = next((k for k in ("blocks.0.att.r_k", "blocks.0.att.time_faaaa") if k in checkpoint), None)
    if head_key is None:
        raise ValueError("this checkpoint has no heads (RWKV v4?): tuned states do not apply")
    n_head, head_size = checkpoint[head_key].shape
    expected_keys = {TIME_STATE_KEY.format(layer=layer) for layer in range(n_layer)}
    if set(state_file) != expected_keys:
        raise ValueError(
            f"state file has {len(state_file)} entries, the checkpoint needs exactly "
            f"blocks.0..{n_layer - 1}.att.time_state"
        )
    for key, tensor in state_file.items():
        if tuple(tensor.shape) != (n_head, head_size, head_size):
            needed = (n_head, head_size, head_size)
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the checkpoint needs {needed}")
    merged = dict(checkpoint)
    merged.update(state_file)
    return merged


def save_checkpoint(path, state_dict: dict[str, torch.Tensor]) -> Path:
    """torch.save `state_dict` to `path` atomically (a temp file in the same folder, then
    os.replace), so a reader never sees a half-written file. Returns the path."""
    return write_atomically(path, lambda temp: torch.save(state_dict, temp))


# ---------------------------------------------------------------------------------------------
# Command line

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_chat.testing.checkpoints",
        description="Write a random-weight RWKV checkpoint in the official layout.",
    )
    parser.add_argument("output", help="path of the .pth file to write")
    parser.add_argument("--version", required=True, choices=VERSIONS)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--embd", type=int, required=True)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--ffn-dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="default bf16, like real files")
    parser.add_argument("--merge-state", action="store_true", help="merge a random tuned state (v5.2/v6/v7)")
    parser.add_argument("--state-out", default=None, help="also write a random tuned-state file here")
    args = parser.parse_args(argv)

    dtype = _DTYPES[args.dtype]
    checkpoint = make_checkpoint(
        args.version, args.layers, args.embd, head_size=args.head_size, vocab_size=args.vocab,
        ffn_dim=args.ffn_dim, seed=args.seed, dtype=dtype,
    )
    if args.merge_state or args.state_out:
        state = make_state_file(args.version, args.layers, args.embd, args.head_size, seed=args.seed + 1)
        if args.merge_state:
            checkpoint = merge_state(checkpoint, state)
        if args.state_out:
            save_checkpoint(args.state_out, state)
    save_checkpoint(args.output, checkpoint)
    n_params = sum(t.numel() for t in checkpoint.values())
    shape = f"{args.layers}x{args.embd}, {n_params / 1e6:.1f}M parameters, {args.dtype}"
    print(f"wrote {args.output}: RWKV v{args.version}, {shape}")


if __name__ == "__main__":
    main()
