"""Small pieces of math every RWKV version shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    weight, bias = params
    return F.layer_norm(x, (x.shape[-1],), weight=weight, bias=bias)


def shifted(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Token shift: row t gets row t-1 of x; row 0 gets the previous call's last row. x: [T, C]."""
    if x.shape[0] == 1:
        return prev.unsqueeze(0)
    return torch.cat((prev.unsqueeze(0), x[:-1]))


def head_group_norm(x: torch.Tensor, n_head: int, params, eps: float = 64e-5) -> torch.Tensor:
    """GroupNorm over heads for a [T, C] input (ln_x)."""
    weight, bias = params
    return F.group_norm(x, n_head, weight=weight, bias=bias, eps=eps)


def vector(t: torch.Tensor, dtype, device) -> torch.Tensor:
    """A [1,1,C]-style parameter as a flat [C] tensor."""
    return t.reshape(-1).to(dtype=dtype, device=device)


def pair(get, name: str, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return vector(get(f"{name}.weight"), dtype, device), vector(get(f"{name}.bias"), dtype, device)
