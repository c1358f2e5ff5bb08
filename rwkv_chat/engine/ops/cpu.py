"""The C-kernel backend (engine/cpu_kernels.py, source in kernels/cpu/): exact recurrences for any
number of tokens, plus the fused single-token steps. Same functions and layouts as torch_ref."""
from __future__ import annotations

import torch

from . import torch_ref

_MAX_V7_HEAD = 1024  # rk_wkv7 / rk_v7_step keep one head's rows on the stack
_STEP_DTYPES = (torch.float32, torch.bfloat16)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


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

    def group_norm_gate(self, out, g, w, dtype):
        """One token: GroupNorm over heads of `out` times silu(g) ([1, C] in dtype); None when the C
        step cannot take it."""
        if dtype not in _STEP_DTYPES:
            return None
        C = out.numel()
        return self.kernels.group_norm_gate(out.reshape(C).float().contiguous(), w.n_head, w.ln_x[0], w.ln_x[1],
                                            64e-5, g.contiguous(), silu=True, dtype=dtype)
