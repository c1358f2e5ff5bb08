"""RWKV-5.2 "Eagle": multi-head matrix state with a learned per-channel decay and bonus."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import v4
from .common import head_group_norm, last_row, layer_norm, mixed, pair, shifted, vector
from .quant import make_linear, run_group


def layer_shapes(d) -> dict[str, tuple]:
    C, F_, H, N = d.n_embd, d.ffn_dim, d.n_head, d.head_size
    shapes = {f"att.time_mix_{n}": (C,) for n in "kvrg"}
    shapes |= {"att.time_decay": (H, N), "att.time_faaaa": (H, N), "att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "gate", "output")}
    shapes |= {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F_, C),
               "ffn.value.weight": (C, F_), "ffn.receptance.weight": (C, C)}
    return shapes


optional_in_layer = v4.optional_in_layer


def prepare_layer(get, plan, device, ops, *, output_scale: float, n_head: int, layer: int) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0, layout="rows": make_linear(get(name), plan, device, scale, layout)
    f32 = lambda name: get(name).to(dtype=torch.float32, device=device, copy=True)
    return SimpleNamespace(
        ops=ops, n_head=n_head,
        ln1=pair(get, "ln1", dt, device), ln2=pair(get, "ln2", dt, device),
        mix=torch.stack([vector(get(f"att.time_mix_{n}"), dt, device) for n in "rkvg"]),  # [4, C]
        decay=torch.exp(-torch.exp(f32("att.time_decay"))).reshape(n_head, -1, 1),  # [H, K, 1]
        bonus=f32("att.time_faaaa").reshape(n_head, -1, 1),  # u, [H, K, 1]
        ln_x=pair(get, "att.ln_x", torch.float32, device),
        key=lin("att.key.weight"), value=lin("att.value.weight"), receptance=lin("att.receptance.weight"),
        gate=lin("att.gate.weight"), output=lin("att.output.weight", output_scale),
        ffn_mix=torch.stack([vector(get(f"ffn.time_mix_{n}"), dt, device) for n in "rk"]),  # [2, C]
        ffn_key=lin("ffn.key.weight"),
        ffn_value=lin("ffn.value.weight", output_scale, "cols"),  # its input relu(k)^2 is mostly zeros
        ffn_receptance=lin("ffn.receptance.weight"),
        fused=None,  # no one-call layer (see v7.py)
        sequences=False,  # x's rows are one sequence's tokens (batch.py's copies: a token of each of B sequences)
    )


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C, H, N = shape.n_embd, shape.n_head, shape.head_size
    return [torch.zeros(C, dtype=plan.dtype, device=device),
            torch.zeros(H, N, N, dtype=torch.float32, device=device),
            torch.zeros(C, dtype=plan.dtype, device=device)]


def attention_output(out, g, x, w):
    """output(GroupNorm(out) * silu(g)); `g` is the gate projection before the silu."""
    T, C = x.shape
    if T == 1 or w.sequences:  # one token (of each sequence): GroupNorm and gate in one call where fused
        y = w.ops.group_norm_gate(out, g, w, x.dtype)
        if y is not None:
            return w.output(y)
    out = head_group_norm(out.reshape(T, C), w.n_head, w.ln_x).to(x.dtype)
    return w.output(out * F.silu(g))


def time_mix(x, w, att_x, state):
    T, C = x.shape
    H = w.n_head
    prev = shifted(x, att_x)
    xr, xk, xv, xg = mixed(prev, x - prev, w.mix)  # x * m + prev * (1 - m)
    r, k, v, g = run_group([(w.receptance, xr), (w.key, xk), (w.value, xv), (w.gate, xg)])
    f32 = lambda t: t.float().view(T, H, -1)
    out, state = w.ops.wkv5(f32(r), f32(k), f32(v), w.decay, w.bonus, state)
    return attention_output(out, g, x, w), last_row(x, att_x), state


def block(x, w, state, v_first):
    att_x, wkv_state, ffn_x = state
    out, att_x, wkv_state = time_mix(layer_norm(x, w.ln1), w, att_x, wkv_state)
    x = x + out
    out, ffn_x = v4.channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, wkv_state, ffn_x], v_first
