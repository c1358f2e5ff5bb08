"""RWKV-5.2 "Eagle": multi-head matrix state with a learned per-channel decay and bonus."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import v4
from . import cuda
from .common import head_group_norm, kernels_for, last_row, layer_norm, mixed, pair, shifted, vector
from .quant import make_linear, run_group

CHUNK = 32  # tokens per chunk of the chunked (plain torch) WKV


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
    lin = lambda name, scale=1.0, layout="rows": make_linear(get(name), plan, device, scale, layout)
    f32 = lambda name: get(name).to(dtype=torch.float32, device=device, copy=True)
    return SimpleNamespace(
        n_head=n_head,
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
    )


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C, H, N = shape.n_embd, shape.n_head, shape.head_size
    return [torch.zeros(C, dtype=plan.dtype, device=device),
            torch.zeros(H, N, N, dtype=torch.float32, device=device),
            torch.zeros(C, dtype=plan.dtype, device=device)]


def wkv(r, k, v, decay, bonus, state):
    """out_t = r_t (u k_t v_t^T + S);  S <- k_t v_t^T + w S.  r,k,v: [T,H,N] fp32; S: [H,K,V].

    `decay` (w) is [H,K,1] (v5.2) or [T,H,K,1] (v6, data dependent); `bonus` (u) is [H,K,1].
    The C kernel when available (exact, any T); else one torch step for a single token and the
    chunked form (`wkv_chunked`) for longer inputs."""
    if cuda.available_for(r):
        return cuda.wkv5(r, k, v, decay, bonus, state)
    kernels = kernels_for(r)
    if kernels is not None:
        c = lambda t: t.float().contiguous()
        w = decay.squeeze(-1)
        return kernels.wkv5(c(r), c(k), c(v), c(w), c(bonus.squeeze(-1)), state.float().contiguous())
    if r.shape[0] == 1:
        return wkv_loop(r, k, v, decay, bonus, state)
    return wkv_chunked(r, k, v, decay, bonus, state)


def wkv_loop(r, k, v, decay, bonus, state):
    """The recurrence one token at a time (reference for the kernel and the chunked form)."""
    T = r.shape[0]
    out = torch.empty_like(r)
    per_token_decay = decay.dim() == 4
    for t in range(T):
        kv = k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        out[t] = (r[t].unsqueeze(-2) @ (bonus * kv + state)).squeeze(-2)
        state = kv + (decay[t] if per_token_decay else decay) * state
    return out, state


def wkv_chunked(r, k, v, decay, bonus, state, chunk: int = CHUNK):
    """The same recurrence, `chunk` tokens at a time with matrix products (exact up to rounding).

    Inside a chunk, with c_t = sum_{m<=t} log w_m per channel (cumulative log decay):
      out_t = r_t (u k_t v_t^T) + sum_{s<t} (r_t * e^(c_{t-1} - c_s) . k_s) v_s + (r_t * e^(c_{t-1})) S0
      S_end = e^(c_last) S0 + sum_s (k_s * e^(c_last - c_s))^T v_s
    Every exponent is <= 0 (a product of decays), so nothing overflows however small w gets; the
    [t, s, channel] decay factors are formed explicitly for that reason (chunks stay short)."""
    T, H, N = r.shape
    log_w = torch.log(decay.squeeze(-1).float()).clamp_min(-1e4)  # [H,N] or [T,H,N]
    if log_w.dim() == 2:
        log_w = log_w.expand(T, H, N)
    u = bonus.reshape(H, N)
    out = torch.empty_like(r)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        L = t1 - t0
        rc, kc, vc = (x[t0:t1].transpose(0, 1) for x in (r, k, v))  # [H, L, N]
        cum = log_w[t0:t1].transpose(0, 1).cumsum(dim=1)  # [H, L, N] inclusive
        before = cum - log_w[t0:t1].transpose(0, 1)  # c_{t-1}: exclusive
        exponent = before.unsqueeze(2) - cum.unsqueeze(1)  # [H, t, s, N]
        causal = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
        factors = torch.exp(exponent.masked_fill(~causal.view(1, L, L, 1), float("-inf")))
        scores = torch.einsum("htn,hsn,htsn->hts", rc, kc, factors)
        diag = (rc * u.unsqueeze(1) * kc).sum(-1)  # [H, L]
        scores = scores + torch.diag_embed(diag)
        o = scores @ vc + (rc * torch.exp(before)) @ state  # [H, L, N]
        out[t0:t1] = o.transpose(0, 1)
        last = cum[:, -1:, :]  # [H, 1, N]
        state = torch.exp(last).transpose(1, 2) * state + (kc * torch.exp(last - cum)).transpose(1, 2) @ vc
    return out, state


def attention_output(out, g, x, w):
    """output(GroupNorm(out) * silu(g)); `g` is the gate projection before the silu."""
    T, C = x.shape
    kernels = kernels_for(x)
    if T == 1 and kernels is not None and x.dtype in (torch.float32, torch.bfloat16):
        # one token: GroupNorm and gate in one C call (torch's group_norm wakes a thread pool)
        y = kernels.group_norm_gate(out.reshape(C).float().contiguous(), w.n_head, w.ln_x[0], w.ln_x[1], 64e-5,
                                    g.contiguous(), silu=True, dtype=x.dtype)
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
    out, state = wkv(f32(r), f32(k), f32(v), w.decay, w.bonus, state)
    return attention_output(out, g, x, w), last_row(x), state


def block(x, w, state, v_first):
    att_x, wkv_state, ffn_x = state
    out, att_x, wkv_state = time_mix(layer_norm(x, w.ln1), w, att_x, wkv_state)
    x = x + out
    out, ffn_x = v4.channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, wkv_state, ffn_x], v_first
