"""RWKV-4: scalar-decay WKV with the numerically safe (aa, bb, pp) running sums."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .common import last_row, layer_norm, mixed, pair, shifted, vector
from .quant import make_linear, run_group


def layer_shapes(d) -> dict[str, tuple]:
    C, F = d.n_embd, d.ffn_dim
    shapes = {f"att.{n}": (C,) for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r")}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "output")}
    shapes |= {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F, C),
               "ffn.value.weight": (C, F), "ffn.receptance.weight": (C, C)}
    return shapes


def optional_in_layer(layer: int) -> set[str]:
    return set()


def prepare_layer(get, plan, device, ops, *, output_scale: float, n_head: int, layer: int) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0, layout="rows": make_linear(get(name), plan, device, scale, layout)
    return SimpleNamespace(
        ops=ops,
        ln1=pair(get, "ln1", dt, device), ln2=pair(get, "ln2", dt, device),
        mix=torch.stack([vector(get(f"att.time_mix_{n}"), dt, device) for n in "rkv"]),  # [3, C]
        decay=-torch.exp(vector(get("att.time_decay"), torch.float32, device)),
        first=vector(get("att.time_first"), torch.float32, device),
        key=lin("att.key.weight"), value=lin("att.value.weight"),
        receptance=lin("att.receptance.weight"), output=lin("att.output.weight", output_scale),
        ffn_mix=torch.stack([vector(get(f"ffn.time_mix_{n}"), dt, device) for n in "rk"]),  # [2, C]
        ffn_key=lin("ffn.key.weight"),
        ffn_value=lin("ffn.value.weight", output_scale, "cols"),  # its input relu(k)^2 is mostly zeros
        ffn_receptance=lin("ffn.receptance.weight"),
        fused=None, sequences=False,  # no one-call layer (see v7.py)
    )


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C = shape.n_embd
    zeros = lambda dtype: torch.zeros(C, dtype=dtype, device=device)
    return [zeros(plan.dtype), zeros(torch.float32), zeros(torch.float32),
            torch.full((C,), -1e30, device=device), zeros(plan.dtype)]


def time_mix(x, w, att_x, aa, bb, pp):
    prev = shifted(x, att_x)
    xr, xk, xv = mixed(prev, x - prev, w.mix)  # x * m + prev * (1 - m)
    r, k, v = run_group([(w.receptance, xr), (w.key, xk), (w.value, xv)])
    out, aa, bb, pp = w.ops.wkv4(k.float(), v.float(), w.decay, w.first, aa, bb, pp)
    return w.output(torch.sigmoid(r) * out.to(x.dtype)), last_row(x, att_x), aa, bb, pp


def channel_mix(x, w, ffn_x):
    prev = shifted(x, ffn_x)
    xr, xk = mixed(prev, x - prev, w.ffn_mix)
    r, k = run_group([(w.ffn_receptance, xr), (w.ffn_key, xk)])
    return torch.sigmoid(r) * w.ffn_value(torch.relu(k).square_()), last_row(x, ffn_x)


def block(x, w, state, v_first):
    att_x, aa, bb, pp, ffn_x = state
    out, att_x, aa, bb, pp = time_mix(layer_norm(x, w.ln1), w, att_x, aa, bb, pp)
    x = x + out
    out, ffn_x = channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, aa, bb, pp, ffn_x], v_first
