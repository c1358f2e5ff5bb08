"""RWKV-4: scalar-decay WKV with the numerically safe (aa, bb, pp) running sums."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .common import layer_norm, pair, shifted, vector
from .quant import make_linear


def layer_shapes(d) -> dict[str, tuple]:
    C, F = d.n_embd, d.ffn_dim
    shapes = {f"att.{n}": (C,) for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r")}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "output")}
    shapes |= {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F, C),
               "ffn.value.weight": (C, F), "ffn.receptance.weight": (C, C)}
    return shapes


def prepare_layer(get, plan, device, output_scale: float) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0: make_linear(get(name), plan, device, scale)
    return SimpleNamespace(
        ln1=pair(get, "ln1", dt, device), ln2=pair(get, "ln2", dt, device),
        mix_k=vector(get("att.time_mix_k"), dt, device),
        mix_v=vector(get("att.time_mix_v"), dt, device),
        mix_r=vector(get("att.time_mix_r"), dt, device),
        decay=-torch.exp(vector(get("att.time_decay"), torch.float32, device)),
        first=vector(get("att.time_first"), torch.float32, device),
        key=lin("att.key.weight"), value=lin("att.value.weight"),
        receptance=lin("att.receptance.weight"), output=lin("att.output.weight", output_scale),
        ffn_mix_k=vector(get("ffn.time_mix_k"), dt, device),
        ffn_mix_r=vector(get("ffn.time_mix_r"), dt, device),
        ffn_key=lin("ffn.key.weight"), ffn_value=lin("ffn.value.weight", output_scale),
        ffn_receptance=lin("ffn.receptance.weight"),
    )


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C = shape.n_embd
    zeros = lambda dtype: torch.zeros(C, dtype=dtype, device=device)
    return [zeros(plan.dtype), zeros(torch.float32), zeros(torch.float32),
            torch.full((C,), -1e30, device=device), zeros(plan.dtype)]


def _mix(x, prev, m):
    return x * m + prev * (1 - m)


def time_mix(x, w, att_x, aa, bb, pp):
    prev = shifted(x, att_x)
    r = torch.sigmoid(w.receptance(_mix(x, prev, w.mix_r)))
    k = w.key(_mix(x, prev, w.mix_k)).float()
    v = w.value(_mix(x, prev, w.mix_v)).float()
    out = torch.empty_like(k)
    for t in range(x.shape[0]):
        # out = (aa + e^(u+k) v) / (bb + e^(u+k)), every exponent shifted by the running max pp
        boosted = w.first + k[t]
        top = torch.maximum(pp, boosted)
        e_state, e_token = torch.exp(pp - top), torch.exp(boosted - top)
        out[t] = (e_state * aa + e_token * v[t]) / (e_state * bb + e_token)
        decayed = w.decay + pp
        top = torch.maximum(decayed, k[t])
        e_state, e_token = torch.exp(decayed - top), torch.exp(k[t] - top)
        aa, bb, pp = e_state * aa + e_token * v[t], e_state * bb + e_token, top
    return w.output(r * out.to(x.dtype)), x[-1], aa, bb, pp


def channel_mix(x, w, ffn_x):
    prev = shifted(x, ffn_x)
    r = torch.sigmoid(w.ffn_receptance(_mix(x, prev, w.ffn_mix_r)))
    k = torch.relu(w.ffn_key(_mix(x, prev, w.ffn_mix_k))) ** 2
    return r * w.ffn_value(k), x[-1]


def block(x, w, state, v_first):
    att_x, aa, bb, pp, ffn_x = state
    out, att_x, aa, bb, pp = time_mix(layer_norm(x, w.ln1), w, att_x, aa, bb, pp)
    x = x + out
    out, ffn_x = channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, aa, bb, pp, ffn_x], v_first
