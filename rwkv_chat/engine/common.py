"""Small pieces of math every RWKV version shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import DenseLinear


def layer_norm(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """LayerNorm in the dtype of its parameters (the layer's). An fp32 residual stream entering a
    bf16 / fp16 layer is normalised in fp32 and rounded once, on the way in."""
    weight, bias = params
    if x.dtype != weight.dtype:
        return F.layer_norm(x.float(), (x.shape[-1],), weight=weight.float(), bias=bias.float()).to(weight.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight=weight, bias=bias)


def shifted(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Token shift: row t gets row t-1 of x; row 0 gets the previous call's last row. x: [T, C].
    In a batch step (prev [B, C]: B sequences, one token each) every row gets its own prev row."""
    if prev.dim() == 2:
        return prev
    if x.shape[0] == 1:
        return prev.unsqueeze(0)
    return torch.cat((prev.unsqueeze(0), x[:-1]))


def last_row(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x[-1], the next call's token-shift state; copied when x has more rows, so that the state
    does not keep the whole [T, C] activation alive. In a batch step (prev [B, C]) all of x."""
    if prev.dim() == 2:
        return x
    return x[-1] if x.shape[0] == 1 else x[-1].clone()


def mixed(x: torch.Tensor, delta: torch.Tensor, mixes: torch.Tensor) -> torch.Tensor:
    """x + delta * m for every row m of `mixes` [n, C] at once: [n, T, C] (each [T, C] slice contiguous)."""
    return torch.addcmul(x.unsqueeze(0), delta.unsqueeze(0), mixes.unsqueeze(1))


def head_group_norm(x: torch.Tensor, n_head: int, params, eps: float = 64e-5) -> torch.Tensor:
    """GroupNorm over heads for a [T, C] input (ln_x)."""
    weight, bias = params
    return F.group_norm(x, n_head, weight=weight, bias=bias, eps=eps)


def vector(t: torch.Tensor, dtype, device) -> torch.Tensor:
    """A [1,1,C]-style parameter as a flat [C] tensor (always a copy, never a view of the file)."""
    return t.reshape(-1).to(dtype=dtype, device=device, copy=True)


def pair(get, name: str, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return vector(get(f"{name}.weight"), dtype, device), vector(get(f"{name}.bias"), dtype, device)


def lora(weight: torch.Tensor, plan, device) -> DenseLinear:
    """A LoRA factor stored [in, out] in the checkpoint, as a linear (small: always dense, resident).
    Under fp32 activations with bf16 matrices (placement.cpu_activations) it is stored in bf16 but
    multiplies its input unrounded: the data-dependent decays and mixes it makes are sensitive to
    that rounding (v6 0.4B: 1 - cosine 8.1e-5 with it, 4.2e-5 without)."""
    return DenseLinear(weight.reshape(-1, weight.shape[-1]).t(), plan.dtype, device, weights=plan.weights, widen=True)
