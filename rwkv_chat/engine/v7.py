"""RWKV-7 "Goose": the generalised delta rule, S <- S diag(w) + S (-kk)(kk*a)^T + v k^T."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .common import head_group_norm, last_row, layer_norm, lora, mixed, pair, shifted, vector
from .quant import make_linear, run_group

DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^-0.5 * sigmoid(.)) keeps every decay in (0.545, 1); C: RK_V7_DECAY_SCALE


def layer_shapes(d) -> dict[str, tuple]:
    C, F_, H, N = d.n_embd, d.ffn_dim, d.n_head, d.head_size
    shapes = {f"att.x_{n}": (C,) for n in "rwkvag"}
    for name, rank in (("w", d.w_dim), ("a", d.a_dim), ("v", d.v_dim)):
        shapes |= {f"att.{name}0": (C,), f"att.{name}1": (C, rank), f"att.{name}2": (rank, C)}
    shapes |= {"att.g1": (C, d.g_dim), "att.g2": (d.g_dim, C), "att.k_k": (C,), "att.k_a": (C,),
               "att.r_k": (H, N), "att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
    shapes |= {f"att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "output")}
    shapes |= {"ffn.x_k": (C,), "ffn.key.weight": (F_, C), "ffn.value.weight": (C, F_)}
    return shapes


def optional_in_layer(layer: int) -> set[str]:
    return {"att.v0", "att.v1", "att.v2"} if layer == 0 else set()


def prepare_layer(get, plan, device, ops, *, output_scale: float, n_head: int, layer: int) -> SimpleNamespace:
    dt = plan.dtype
    lin = lambda name, scale=1.0, layout="rows": make_linear(get(name), plan, device, scale, layout)
    vec = lambda name: vector(get(name), dt, device)
    small = lambda name: lora(get(name), plan, device)
    w = SimpleNamespace(
        ops=ops, n_head=n_head, first_layer=layer == 0,
        ln1=pair(get, "ln1", dt, device), ln2=pair(get, "ln2", dt, device),
        mix=torch.stack([vec(f"att.x_{n}") for n in "rwkvag"]),  # [6, C]
        w0=vector(get("att.w0"), torch.float32, device), w1=small("att.w1"), w2=small("att.w2"),
        a0=vec("att.a0"), a1=small("att.a1"), a2=small("att.a2"),
        g1=small("att.g1"), g2=small("att.g2"),
        k_k=vec("att.k_k"), k_a=vec("att.k_a"), r_k=vec("att.r_k"),
        ln_x=pair(get, "att.ln_x", dt, device),
        key=lin("att.key.weight"), value=lin("att.value.weight"), receptance=lin("att.receptance.weight"),
        output=lin("att.output.weight", output_scale),
        ffn_x_k=vec("ffn.x_k"), ffn_key=lin("ffn.key.weight"),
        ffn_value=lin("ffn.value.weight", output_scale, "cols"),  # its input relu(k)^2 is mostly zeros
    )
    if layer > 0:
        w.v0, w.v1, w.v2 = vec("att.v0"), small("att.v1"), small("att.v2")
    w.fused = ops.prepare_v7_layer(w)  # one call per layer for a single token, where the backend has it
    w.sequences = False  # x's rows are one sequence's tokens (batch.py's copies: a token of each of B sequences)
    return w


def zero_state(shape, plan, device) -> list[torch.Tensor]:
    C, H, N = shape.n_embd, shape.n_head, shape.head_size
    return [torch.zeros(C, dtype=plan.dtype, device=device),
            torch.zeros(H, N, N, dtype=torch.float32, device=device),
            torch.zeros(C, dtype=plan.dtype, device=device)]


def time_mix(x, w, att_x, state, v_first):
    T, C = x.shape
    H = w.n_head
    xr, xw, xk, xv, xa, xg = mixed(x, shifted(x, att_x) - x, w.mix)

    first = [(w.receptance, xr), (w.key, xk), (w.value, xv), (w.w1, xw), (w.a1, xa), (w.g1, xg)]
    if not w.first_layer:
        first.append((w.v1, xv))
    r, k, v, w_low, a_low, g_low, *v_low = run_group(first)
    second = [(w.w2, torch.tanh(w_low)), (w.a2, a_low), (w.g2, torch.sigmoid(g_low))]
    if v_low:
        second.append((w.v2, v_low[0]))
    w_lora, a_lora, g, *v_lora = run_group(second)
    if T == 1:  # one token: everything up to the output projection in one call where the backend fuses it
        fused = w.ops.v7_step(w, r, k, v, w_lora, a_lora, g, v_lora[0] if v_lora else None,
                              None if w.first_layer else v_first, state)
        if fused is not None:
            y, v, state = fused
            return w.output(y), last_row(x, att_x), state, (v if w.first_layer else v_first)

    # Several tokens: the same math as the fused step, in fp32 whatever the weights' dtype. At the
    # first token a head's output is v * (r . k); where that dot product nearly cancels, GroupNorm
    # scales its rounding error up to unit size, so bf16 rounding here would cost far more than
    # the weights' own error (cosine 0.97 instead of the decode path's 0.995 at position 0).
    r, k, v, g = r.float(), k.float(), v.float(), g.float()
    a = torch.sigmoid(w.a0 + a_lora.float())  # in-context learning rate
    decay = torch.exp(torch.sigmoid(w.w0 + w_lora.float()).mul_(-DECAY_SCALE))
    kk = torch.nn.functional.normalize((k * w.k_k).view(T, H, -1), dim=-1)  # removal key, unit length per head
    k = k * (1 + (a - 1) * w.k_a)
    if w.first_layer:
        v_first = v
    else:  # value residual: blend in layer 0's values
        v = v + (v_first - v) * torch.sigmoid(w.v0 + v_lora[0].float())

    view = lambda t: t.view(T, H, -1)
    out, state = w.ops.wkv7(view(r), view(decay), view(k), view(v), kk, view(a), state)

    out = head_group_norm(out.view(T, C), H, (w.ln_x[0].float(), w.ln_x[1].float()))
    bonus = (r * k * w.r_k).view(T, H, -1).sum(dim=-1, keepdim=True) * v.view(T, H, -1)
    return w.output(((out + bonus.view(T, C)) * g).to(x.dtype)), last_row(x, att_x), state, v_first


def channel_mix(x, w, ffn_x):
    k = torch.addcmul(x, shifted(x, ffn_x) - x, w.ffn_x_k)
    return w.ffn_value(torch.relu(w.ffn_key(k)).square_()), last_row(x, ffn_x)


def block(x, w, state, v_first):
    if w.fused is not None and (x.shape[0] == 1 or w.sequences):  # one token (of each sequence)
        return w.ops.layer("7", x, w, state, v_first)  # fp32 activations out (see RWKV._run_layers)
    att_x, wkv_state, ffn_x = state
    out, att_x, wkv_state, v_first = time_mix(layer_norm(x, w.ln1), w, att_x, wkv_state, v_first)
    x = x + out
    out, ffn_x = channel_mix(layer_norm(x, w.ln2), w, ffn_x)
    return x + out, [att_x, wkv_state, ffn_x], v_first
