"""RWKV-6 "Finch": v5.2's state with data-dependent token shift (ddlerp) and decay."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import v5_2
from .common import last_row, layer_norm, lora, mixed, pair, shifted, vector
from .quant import make_linear, run_group


def layer_shapes(d) -> dict[str, tuple]:
    C, F_, H, N, D, Dd = d.n_embd, d.ffn_dim, d.n_head, d.head_size, d.maa_dim, d.decay_dim
    shapes = {f"att.time_maa_{n}": (C,) for n in "xwkvrg"}
    shapes |= {"att.time_maa_w1": (C, 5 * D), "att.time_maa_w2": (5, D, C), "att.time_decay": (C,),
               "att.time_decay_w1": (C, Dd), "att.time_decay_w2": (Dd, C), "att.time_faaaa": (H, N),
               "att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "gate", "output")}
    shapes |= {"ffn.time_maa_k": (C,), "ffn.time_maa_r": (C,), "ffn.key.weight": (F_, C),
               "ffn.value.weight": (C, F_), "ffn.receptance.weight": (C, C)}
    return shapes


optional_in_layer = v5_2.optional_in_layer


def prepare_layer(get, plan, device, ops, *, output_scale: float, n_head: int, layer: int) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0, layout="rows": make_linear(get(name), plan, device, scale, layout)
    vec = lambda name: vector(get(name), dt, device)
    w = SimpleNamespace(
        ops=ops, n_head=n_head,
        ln1=pair(get, "ln1", dt, device), ln2=pair(get, "ln2", dt, device),
        maa_x=vec("att.time_maa_x"),
        maa=torch.stack([vec(f"att.time_maa_{n}") for n in "wkvrg"]),  # [5, C]
        maa_w1=lora(get("att.time_maa_w1"), plan, device),  # C -> 5*D
        maa_w2=[lora(part, plan, device) for part in get("att.time_maa_w2")],  # five D -> C
        decay_base=get("att.time_decay").reshape(n_head, -1, 1).to(dtype=torch.float32, device=device, copy=True),  # [H, K, 1]
        decay_w1=lora(get("att.time_decay_w1"), plan, device), decay_w2=lora(get("att.time_decay_w2"), plan, device),
        bonus=get("att.time_faaaa").reshape(n_head, -1, 1).to(dtype=torch.float32, device=device, copy=True),
        ln_x=pair(get, "att.ln_x", torch.float32, device),
        key=lin("att.key.weight"), value=lin("att.value.weight"), receptance=lin("att.receptance.weight"),
        gate=lin("att.gate.weight"), output=lin("att.output.weight", output_scale),
        ffn_maa=torch.stack([vec("ffn.time_maa_r"), vec("ffn.time_maa_k")]),  # [2, C]
        ffn_key=lin("ffn.key.weight"),
        ffn_value=lin("ffn.value.weight", output_scale, "cols"),  # its input relu(k)^2 is mostly zeros
        ffn_receptance=lin("ffn.receptance.weight"),
    )
    w.fused = ops.prepare_v6_layer(w)  # one call per layer for a single token, where the backend has it
    w.sequences = False  # x's rows are one sequence's tokens (batch.py's copies: a token of each of B sequences)
    return w


zero_state = v5_2.zero_state


def time_mix(x, w, att_x, state):
    T, C = x.shape
    H = w.n_head
    delta = shifted(x, att_x) - x
    # ddlerp: five low-rank, data-dependent offsets to the static mixing coefficients
    lora_in = torch.tanh(w.maa_w1(torch.addcmul(x, delta, w.maa_x))).view(T, 5, -1).transpose(0, 1)  # [5, T, D]
    lora_out = torch.stack(run_group(list(zip(w.maa_w2, lora_in))))  # [5, T, C]
    xw, xk, xv, xr, xg = torch.addcmul(x, delta, lora_out + w.maa.unsqueeze(1))

    r, k, v, g, decay_low = run_group([(w.receptance, xr), (w.key, xk), (w.value, xv), (w.gate, xg), (w.decay_w1, xw)])
    log_decay = w.decay_base + w.decay_w2(torch.tanh(decay_low)).float().view(T, H, -1, 1)
    decay = torch.exp(-torch.exp(log_decay))  # [T, H, K, 1]
    f32 = lambda t: t.float().view(T, H, -1)
    out, state = w.ops.wkv5(f32(r), f32(k), f32(v), decay, w.bonus, state)
    return v5_2.attention_output(out, g, x, w), last_row(x, att_x), state


def channel_mix(x, w, ffn_x):
    delta = shifted(x, ffn_x) - x
    xr, xk = mixed(x, delta, w.ffn_maa)
    r, k = run_group([(w.ffn_receptance, xr), (w.ffn_key, xk)])
    return torch.sigmoid(r) * w.ffn_value(torch.relu(k).square_()), last_row(x, ffn_x)


def block(x, w, state, v_first):
    if w.fused is not None and (x.shape[0] == 1 or w.sequences):  # one token (of each sequence)
        return w.ops.layer("6", x, w, state, v_first)  # fp32 activations out (see RWKV._run_layers)
    att_x, wkv_state, ffn_x = state
    out, att_x, wkv_state = time_mix(layer_norm(x, w.ln1), w, att_x, wkv_state)
    x = x + out
    out, ffn_x = channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, wkv_state, ffn_x], v_first
