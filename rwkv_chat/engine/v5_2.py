"""RWKV-5.2 "Eagle": multi-head matrix state with a learned per-channel decay and bonus."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import v4
from .common import head_group_norm, layer_norm, pair, shifted, vector
from .quant import make_linear


def layer_shapes(d) -> dict[str, tuple]:
    C, F_, H, N = d.n_embd, d.ffn_dim, d.n_head, d.head_size
    shapes = {f"att.time_mix_{n}": (C,) for n in "kvrg"}
    shapes |= {"att.time_decay": (H, N), "att.time_faaaa": (H, N), "att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "gate", "output")}
    shapes |= {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F_, C),
               "ffn.value.weight": (C, F_), "ffn.receptance.weight": (C, C)}
    return shapes


def prepare_layer(get, plan, device, output_scale: float, n_head: int) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0: make_linear(get(name), plan, device, scale)
    f32 = lambda name: get(name).float().to(device)
    return SimpleNamespace(
        n_head=n_head,
        ln1=pair(get, "ln1", dt, device), ln2=pair(get, "ln2", dt, device),
        mix_k=vector(get("att.time_mix_k"), dt, device), mix_v=vector(get("att.time_mix_v"), dt, device),
        mix_r=vector(get("att.time_mix_r"), dt, device), mix_g=vector(get("att.time_mix_g"), dt, device),
        decay=torch.exp(-torch.exp(f32("att.time_decay"))).reshape(n_head, -1, 1),  # [H, K, 1]
        bonus=f32("att.time_faaaa").reshape(n_head, -1, 1),  # u, [H, K, 1]
        ln_x=pair(get, "att.ln_x", torch.float32, device),
        key=lin("att.key.weight"), value=lin("att.value.weight"), receptance=lin("att.receptance.weight"),
        gate=lin("att.gate.weight"), output=lin("att.output.weight", output_scale),
        ffn_mix_k=vector(get("ffn.time_mix_k"), dt, device), ffn_mix_r=vector(get("ffn.time_mix_r"), dt, device),
        ffn_key=lin("ffn.key.weight"), ffn_value=lin("ffn.value.weight", output_scale),
        ffn_receptance=lin("ffn.receptance.weight"),
    )


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C, H, N = shape.n_embd, shape.n_head, shape.head_size
    return [torch.zeros(C, dtype=plan.dtype, device=device),
            torch.zeros(H, N, N, dtype=torch.float32, device=device),
            torch.zeros(C, dtype=plan.dtype, device=device)]


def wkv(r, k, v, decay, bonus, state):
    """out_t = r_t (u k_t v_t^T + S);  S <- k_t v_t^T + w S.  r,k,v: [T,H,N] fp32; S: [H,K,V].

    `decay` is [H,K,1] (v5.2) or [T,H,K,1] (v6, data dependent)."""
    T = r.shape[0]
    out = torch.empty_like(r)
    per_token_decay = decay.dim() == 4
    for t in range(T):
        kv = k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        out[t] = (r[t].unsqueeze(-2) @ (bonus * kv + state)).squeeze(-2)
        state = kv + (decay[t] if per_token_decay else decay) * state
    return out, state


def attention_output(out, g, x, w):
    T, C = x.shape
    out = head_group_norm(out.reshape(T, C), w.n_head, w.ln_x).to(x.dtype)
    return w.output(out * g)


def time_mix(x, w, att_x, state):
    T, C = x.shape
    H = w.n_head
    prev = shifted(x, att_x)
    mix = lambda m: x * m + prev * (1 - m)
    r = w.receptance(mix(w.mix_r)).float().view(T, H, -1)
    k = w.key(mix(w.mix_k)).float().view(T, H, -1)
    v = w.value(mix(w.mix_v)).float().view(T, H, -1)
    g = F.silu(w.gate(mix(w.mix_g)))
    out, state = wkv(r, k, v, w.decay, w.bonus, state)
    return attention_output(out, g, x, w), x[-1], state


def block(x, w, state, v_first):
    att_x, wkv_state, ffn_x = state
    out, att_x, wkv_state = time_mix(layer_norm(x, w.ln1), w, att_x, wkv_state)
    x = x + out
    out, ffn_x = v4.channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, wkv_state, ffn_x], v_first
