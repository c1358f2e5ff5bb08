"""The reference backend: every recurrence in plain torch, one token at a time (plus the exact
chunked forms of the v5.2/v6 and v7 WKV, which are faster for long inputs; the trainer runs
the v7 one). The fallback on any device and
the twin the C and CUDA kernels are tested against.

Layouts (T tokens, H heads of N channels; all float32):
    wkv4(k, v, decay, first, aa, bb, pp) -> (out, aa, bb, pp)     k, v [T, C]; the rest [C]
    wkv5(r, k, v, decay, bonus, state)   -> (out, state)          r, k, v [T, H, N]; state [H, K, V];
        decay [H, K, 1] (v5.2) or [T, H, K, 1] (v6); bonus [H, K, 1]
    wkv7(r, decay, k, v, kk, a, state)   -> (out, state)          all [T, H, N]; state [H, V, K]
The state passed in is never modified.
"""
from __future__ import annotations

import torch

NAME = "torch"
CHUNK = 32  # tokens per chunk of wkv5_chunked
V7_CHUNK = 32  # tokens per chunk of wkv7_chunked
V7_CHUNKED_FROM = 4  # wkv7 runs the chunked form from this many tokens on (measured faster: docs/benchmarks.md)
kernels = None  # no CPU kernels (their thread settings): see ops/cpu.py


def v7_step(w, r, k, v, w_lora, a_lora, g, v_lora, v_first, state):
    """No fused single-token step here: None, and v7.py runs the torch math."""
    return None


def prepare_v7_layer(w):
    """No one-call layer here: None, and v7.py / v6.py run the layer op by op."""
    return None


prepare_v6_layer = prepare_v7_layer


def group_norm_gate(out, g, w, dtype):
    """No fused single-token step here: None, and v5_2.py runs the torch math."""
    return None


def wkv4(k, v, decay, first, aa, bb, pp):
    """out_t = (aa + e^(u+k_t) v_t) / (bb + e^(u+k_t)), then the sums decay by e^decay and take in
    token t; every exponent is shifted by the running maximum pp."""
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


def wkv5(r, k, v, decay, bonus, state):
    """out_t = r_t (u k_t v_t^T + S);  S <- k_t v_t^T + w S: one step for a single token, the
    chunked form for longer inputs."""
    if r.shape[0] == 1:
        return wkv5_loop(r, k, v, decay, bonus, state)
    return wkv5_chunked(r, k, v, decay, bonus, state)


def wkv5_loop(r, k, v, decay, bonus, state):
    """The v5.2/v6 recurrence one token at a time."""
    out = torch.empty_like(r)
    per_token_decay = decay.dim() == 4
    for t in range(r.shape[0]):
        kv = k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        out[t] = (r[t].unsqueeze(-2) @ (bonus * kv + state)).squeeze(-2)
        state = kv + (decay[t] if per_token_decay else decay) * state
    return out, state


def wkv5_chunked(r, k, v, decay, bonus, state, chunk: int = CHUNK):
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


def wkv7(r, decay, k, v, kk, a, state):
    """S <- S diag(w) + (S (-kk)) (kk*a)^T + v k^T ;  out = S r: one token at a time for short
    inputs, the chunked form from V7_CHUNKED_FROM tokens on (faster). Leading batch dimensions
    are allowed ([..., T, H, N], state [..., H, N, N]); autograd works through both forms (the
    trainer uses this function)."""
    if r.shape[-3] < V7_CHUNKED_FROM:
        return wkv7_loop(r, decay, k, v, kk, a, state)
    return wkv7_chunked(r, decay, k, v, kk, a, state)


def wkv7_loop(r, decay, k, v, kk, a, state):
    """The v7 recurrence one token at a time."""
    out = []
    for t in range(r.shape[-3]):
        r_t, w_t, k_t, v_t, kk_t, a_t = (x[..., t, :, :] for x in (r, decay, k, v, kk, a))
        removal = (state @ -kk_t.unsqueeze(-1)) @ (kk_t * a_t).unsqueeze(-2)
        state = state * w_t.unsqueeze(-2) + removal + v_t.unsqueeze(-1) @ k_t.unsqueeze(-2)
        out.append((state @ r_t.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out, dim=-3), state


def wkv7_chunked(r, decay, k, v, kk, a, state, chunk: int = V7_CHUNK):
    """The same recurrence, `chunk` tokens at a time with matrix products (exact up to rounding);
    a last, shorter chunk takes the tokens left over."""
    T = r.shape[-3]
    whole = T - T % chunk
    parts = [(0, whole, chunk)] if whole else []
    if whole < T:
        parts.append((whole, T, T - whole))
    outs = []
    for t0, t1, length in parts:
        out, state = _wkv7_chunks(*(x[..., t0:t1, :, :] for x in (r, decay, k, v, kk, a)), state, length)
        outs.append(out)
    return torch.cat(outs, dim=-3), state


def _wkv7_chunks(r, decay, k, v, kk, a, state, L):
    """T (a multiple of L) tokens in chunks of L. Write a step as S_t = S_{t-1} (D_t + z_t b_t^T)
    + v_t k_t^T with D_t = diag(w_t), z = -kk, b = kk * a. Inside a chunk let G_t = w_1 ... w_t
    (per channel, G_0 = 1). In the decay-free frame S~_t = S_t diag(1/G_t) every step only adds
    rank-one terms: S~_t = S_0 + sum_{s<=t} u_s (b_s/G_s)^T + v_s (k_s/G_s)^T with u_t = S_{t-1} z_t.
    Substituting S_{t-1} gives a unit lower-triangular system for all u_t of the chunk at once;
    the outputs y_t = S~_t (G_t r_t) and the end state are then products of [L, N] matrices.
    Decays are above exp(-e^-1/2) ~ 0.545 per step, so 1/G stays below 0.545^-L (~3e8 for L = 32):
    safe in float32."""
    *batch, T, H, N = r.shape
    n = T // L

    def chunks(x):  # [..., T, H, N] -> [..., H, n, L, N]
        return x.unflatten(-3, (n, L)).movedim(-2, -4)

    r, k, v = chunks(r), chunks(k), chunks(v)
    z, b = chunks(-kk), chunks(kk * a)
    log_w = chunks(torch.log(decay))
    log_g = torch.cumsum(log_w, dim=-2)  # log G_t (inclusive)
    r_hat = r * torch.exp(log_g)
    z_bar = z * torch.exp(log_g - log_w)  # z_t G_{t-1}
    inv_g = torch.exp(-log_g)
    b_hat, k_hat = b * inv_g, k * inv_g
    g_end = torch.exp(log_g[..., -1:, :])  # G_L, [..., H, n, 1, N]
    b_end, k_end = b_hat * g_end, k_hat * g_end  # b_s G_L / G_s, bounded by b_s

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
    zero = r.new_zeros(())
    m_b = torch.where(strict, z_bar @ b_hat.transpose(-1, -2), zero)
    m_k = torch.where(strict, z_bar @ k_hat.transpose(-1, -2), zero)
    a_rb = torch.where(incl, r_hat @ b_hat.transpose(-1, -2), zero)
    a_rk = torch.where(incl, r_hat @ k_hat.transpose(-1, -2), zero)
    lhs = torch.eye(L, dtype=r.dtype, device=r.device) - m_b  # unit lower triangular
    mkv, rkv = m_k @ v, a_rk @ v  # [..., H, n, L, N]

    out = []
    for c in range(n):
        part = lambda x: x[..., c, :, :]
        state_t = state.transpose(-1, -2)
        u = torch.linalg.solve_triangular(part(lhs), part(z_bar) @ state_t + part(mkv), upper=False,
                                          unitriangular=True)
        out.append(part(r_hat) @ state_t + part(a_rb) @ u + part(rkv))
        state = state * part(g_end) + u.transpose(-1, -2) @ part(b_end) + part(v).transpose(-1, -2) @ part(k_end)
    y = torch.stack(out, dim=-3)  # [..., H, n, L, N]
    return y.movedim(-4, -2).flatten(-4, -3), state
