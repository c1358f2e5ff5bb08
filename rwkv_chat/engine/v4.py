"""RWKV-4: scalar-decay WKV with the numerically safe (aa, bb, pp) running sums."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import cuda
from .common import kernels_for, last_row, layer_norm, mixed, pair, shifted, vector
from .quant import make_linear, run_group


def layer_shapes(d) -> dict[str, tuple]:
    C, F = d.n_embd, d.ffn_dim
    shapes = {f"att.{n}": (C,) for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r")}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "output")}
    shapes |= {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F, C),
               "ffn.value.weight": (C, F), "ffn.receptance.weight": (C, C)}
    return shapes


def prepare_layer(get, plan, device, output_scale: float) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0, layout="rows": make_linear(get(name), plan, device, scale, layout)
    return SimpleNamespace(
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
    )


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C = shape.n_embd
    zeros = lambda dtype: torch.zeros(C, dtype=dtype, device=device)
    return [zeros(plan.dtype), zeros(torch.float32), zeros(torch.float32),
            torch.full((C,), -1e30, device=device), zeros(plan.dtype)]


def wkv(k, v, decay, first, aa, bb, pp):
    """out_t = (aa + e^(u+k_t) v_t) / (bb + e^(u+k_t)), then the sums decay by e^decay and take in
    token t; every exponent is shifted by the running maximum pp.  k, v: [T, C] fp32.

    The C kernel when available, else the per-token loop in torch."""
    if cuda.available_for(k):
        return cuda.wkv4(k, v, decay, first, aa, bb, pp)
    kernels = kernels_for(k)
    if kernels is not None:
        c = lambda t: t.float().contiguous()
        return kernels.wkv4(c(k), c(v), c(decay), c(first), c(aa), c(bb), c(pp))
    return wkv_loop(k, v, decay, first, aa, bb, pp)


def wkv_loop(k, v, decay, first, aa, bb, pp):
    out = torch.empty_like(k)
    for t in range(k.shape[0]):
        boosted = first + k[t]
        top = torch.maximum(pp, boosted)
        e_state, e_token = torch.exp(pp - top), torch.exp(boosted - top)
        out[t] = (e_state * aa + e_token * v[t]) / (e_state * bb + e_token)
        decayed = decay + pp
        top = torch.maximum(decayed, k[t])
        e_state, e_token = torch.exp(decayed - top), torch.exp(k[t] - top)
        aa, bb, pp = e_state * aa + e_token * v[t], e_state * bb + e_token, top
    return out, aa, bb, pp


def time_mix(x, w, att_x, aa, bb, pp):
    prev = shifted(x, att_x)
    xr, xk, xv = mixed(prev, x - prev, w.mix)  # x * m + prev * (1 - m)
    r, k, v = run_group([(w.receptance, xr), (w.key, xk), (w.value, xv)])
    out, aa, bb, pp = wkv(k.float(), v.float(), w.decay, w.first, aa, bb, pp)
    return w.output(torch.sigmoid(r) * out.to(x.dtype)), last_row(x), aa, bb, pp


def channel_mix(x, w, ffn_x):
    prev = shifted(x, ffn_x)
    xr, xk = mixed(prev, x - prev, w.ffn_mix)
    r, k = run_group([(w.ffn_receptance, xr), (w.ffn_key, xk)])
    return torch.sigmoid(r) * w.ffn_value(torch.relu(k).square_()), last_row(x)


def block(x, w, state, v_first):
    att_x, aa, bb, pp, ffn_x = state
    out, att_x, aa, bb, pp = time_mix(layer_norm(x, w.ln1), w, att_x, aa, bb, pp)
    x = x + out
    out, ffn_x = channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, aa, bb, pp, ffn_x], v_first
