"""The C-kernel backend (engine/cpu_kernels.py, source in kernels/cpu/): exact recurrences for any
number of tokens, plus the fused single-token steps. Same functions and layouts as torch_ref."""
from __future__ import annotations

from array import array

import torch

from . import torch_ref

_MAX_V7_HEAD = 1024  # rk_wkv7 / rk_v7_step keep one head's rows on the stack
_STEP_DTYPES = (torch.float32, torch.bfloat16)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _job_words(linears) -> list[int] | None:
    """rk_gemv job words (x and y left 0) of each linear (a None: 8 zeros); None when one has no
    kernel job."""
    words = []
    for linear in linears:
        job = getattr(linear, "_job", None)
        if linear is not None and (job is None or getattr(linear, "_kernels", None) is None):
            return None
        words += [0] * 8 if linear is None else [job[0], job[1], 0, 0, *job[2:]]
    return words


def _layer_words(w, flag: int, vectors, jobs) -> array | None:
    """The layer struct of rk_v7_layer / rk_v6_layer: H, N, bf16 flag, `flag`, vector pointers, jobs."""
    if jobs is None:
        return None
    bf16 = int(w.ln1[0].dtype == torch.bfloat16)
    N = w.ln1[0].numel() // w.n_head
    return array("q", [w.n_head, N, bf16, int(flag), *[0 if t is None else t.data_ptr() for t in vectors], *jobs])


class CpuOps:
    NAME = "cpu kernels"

    def __init__(self, kernels):
        self.kernels = kernels  # cpu_kernels.Kernels (its thread settings: RWKV._thread_mode)

    def wkv4(self, k, v, decay, first, aa, bb, pp):
        return self.kernels.wkv4(_c(k), _c(v), _c(decay), _c(first), _c(aa), _c(bb), _c(pp))

    def wkv5(self, r, k, v, decay, bonus, state):
        return self.kernels.wkv5(_c(r), _c(k), _c(v), _c(decay.squeeze(-1)), _c(bonus.squeeze(-1)), _c(state))

    def wkv7(self, r, decay, k, v, kk, a, state):
        if r.shape[-1] > _MAX_V7_HEAD:
            return torch_ref.wkv7(r, decay, k, v, kk, a, state)
        return self.kernels.wkv7(_c(r), _c(decay), _c(k), _c(v), _c(kk), _c(a), _c(state))

    def v7_step(self, w, r, k, v, w_lora, a_lora, g, v_lora, v_first, state):
        """One token of the v7 time mix between the projections and the output projection ->
        (output projection input, mixed v, new state); None when the C step cannot take it."""
        if r.dtype not in _STEP_DTYPES or state.shape[-1] > _MAX_V7_HEAD:
            return None
        v_in = None if v_first is None else v_first.to(r.dtype).contiguous()
        return self.kernels.v7_step(w, r, k, v, w_lora, a_lora, g, v_lora, v_in, _c(state))

    def prepare_v7_layer(self, w):
        """The words rk_v7_layer reads (pointers to w's tensors and its linears' kernel jobs), or
        None when the one-call layer cannot run it (a linear without a kernel job, e.g. streamed)."""
        if w.mix.dtype not in _STEP_DTYPES or w.r_k.numel() // w.n_head > _MAX_V7_HEAD:
            return None
        jobs = _job_words([w.receptance, w.key, w.value, w.w1, w.a1, w.g1, getattr(w, "v1", None), w.w2, w.a2, w.g2,
                           getattr(w, "v2", None), w.output, w.ffn_key, w.ffn_value])
        vectors = [*w.ln1, *w.ln2, w.mix, w.ffn_x_k, w.w0, w.a0, w.k_k, w.k_a, getattr(w, "v0", None), w.r_k, *w.ln_x]
        return _layer_words(w, not w.first_layer, vectors, jobs)

    def prepare_v6_layer(self, w):
        """As prepare_v7_layer, for rk_v6_layer."""
        if w.maa.dtype not in _STEP_DTYPES:
            return None
        jobs = _job_words([w.maa_w1, *w.maa_w2, w.receptance, w.key, w.value, w.gate, w.decay_w1, w.decay_w2, w.output,
                           w.ffn_receptance, w.ffn_key, w.ffn_value])
        vectors = [*w.ln1, *w.ln2, w.maa_x, w.maa, w.ffn_maa, w.decay_base, w.bonus, *w.ln_x]
        return _layer_words(w, 0, vectors, jobs)

    def layer(self, version, x, w, state, v_first):
        """One token through a whole v7 / v6 layer in one C call -> (x [B, C] fp32, state, v_first
        fp32 or None); None when w has no prepared words. x: [1, C] and one sequence's state, or
        [B, C] and a list of B sequences' states (a batch, engine/batch.py: w.sequences)."""
        if w.fused is None:
            return None
        x = x.to(torch.float32, copy=True).contiguous()
        if v_first is not None:
            v_first = v_first.float().contiguous()
        rows, v_first = self.kernels.layer(version, w.fused, x, state if w.sequences else [state], v_first)
        return x, (rows if w.sequences else rows[0]), v_first

    def layers(self, version, words, x, states):
        """One token (of each of B sequences) through every layer in one C call -> (x [B, C] fp32,
        new states [layer][sequence]); `words`: the layers' word arrays (one_call_layers)."""
        x = x.to(torch.float32, copy=True).contiguous()
        return x, self.kernels.layers(version, words, x, states)

    def group_norm_gate(self, out, g, w, dtype):
        """One token: GroupNorm over heads of `out` times silu(g) ([1, C] in dtype); None when the C
        step cannot take it."""
        if dtype not in _STEP_DTYPES:
            return None
        C = out.numel()
        return self.kernels.group_norm_gate(out.reshape(C).float().contiguous(), w.n_head, w.ln_x[0], w.ln_x[1],
                                            64e-5, g.contiguous(), silu=True, dtype=dtype)


def one_call_layers(layers, version: str) -> array | None:
    """The addresses of the layers' word arrays when every layer is a one-call layer of these
    kernels (v6 / v7 on the CPU), so a token runs them all in one call (CpuOps.layers); else None."""
    if version not in ("6", "7") or not layers or any(getattr(w, "fused", None) is None for w in layers):
        return None
    if not all(isinstance(w.ops, CpuOps) and w.ops.kernels is layers[0].ops.kernels for w in layers):
        return None
    return array("q", [w.fused.buffer_info()[0] for w in layers])
