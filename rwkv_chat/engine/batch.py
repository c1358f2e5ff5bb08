"""One decode step for B sequences at once (a server's continuous batch).

Every linear runs on the [B, C] matrix of the B current tokens, so the weights are read once per
step for all sequences (the prefill GEMM path); layer norms, mixes and gates are row-wise anyway.
Only the per-sequence parts differ from a T-token forward: the token shift takes each row's own
previous token (common.shifted / last_row with a [B, C] prev), and the recurrences run one row at
a time through the layer's own backend (`RowOps`), the very call a single-token forward makes.

Batch states are the per-sequence tensors stacked on a new first axis ([B, C], [B, H, N, N]).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import quant


class RowOps:
    """A backend (ops.torch_ref, ops.cpu.CpuOps, ops.cuda) applied row by row: row b of every
    per-token input is one token of sequence b, whose state is row b of the stacked state."""

    def __init__(self, inner):
        self.inner = inner
        self.kernels = inner.kernels

    def wkv4(self, k, v, decay, first, aa, bb, pp):
        rows = [self.inner.wkv4(k[b:b + 1], v[b:b + 1], decay, first, aa[b], bb[b], pp[b]) for b in range(k.shape[0])]
        out, aa, bb, pp = zip(*rows)
        return torch.cat(out), torch.stack(aa), torch.stack(bb), torch.stack(pp)

    def wkv5(self, r, k, v, decay, bonus, state):
        per_token = decay.dim() == 4  # v6: [B, H, K, 1], one decay per sequence's token
        rows = [self.inner.wkv5(r[b:b + 1], k[b:b + 1], v[b:b + 1], decay[b:b + 1] if per_token else decay, bonus,
                                state[b]) for b in range(r.shape[0])]
        out, states = zip(*rows)
        return torch.cat(out), torch.stack(states)

    def wkv7(self, r, decay, k, v, kk, a, state):
        rows = [self.inner.wkv7(r[b:b + 1], decay[b:b + 1], k[b:b + 1], v[b:b + 1], kk[b:b + 1], a[b:b + 1], state[b])
                for b in range(r.shape[0])]
        out, states = zip(*rows)
        return torch.cat(out), torch.stack(states)

    def v7_step(self, *args):
        return None  # the fused one-token steps are for one sequence: the torch math runs per row

    def group_norm_gate(self, *args):
        return None


class RowByRow:
    """A quantized kernel linear for a few rows: each row is its own single-token job, up to 16 of
    them in one C call (a layer's weights stay in cache from one row to the next), where the
    multi-token path would expand every weight to floats at every step."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != self.inner.dtype:
            return self.inner(x)
        x = x.contiguous()
        rows = []
        for start in range(0, x.shape[0], 16):
            rows += quant.run_group([(self.inner, x[b:b + 1]) for b in range(start, min(start + 16, x.shape[0]))])
        return torch.cat(rows)


def batch_linear(linear):
    """`linear` itself, or RowByRow over it when it is a quantized linear the C kernels run."""
    return RowByRow(linear) if isinstance(linear, quant.QuantLinear) and linear._job is not None else linear


def batch_layers(layers) -> list[SimpleNamespace]:
    """Each prepared layer with its backend wrapped in RowOps and its quantized kernel linears in
    RowByRow (the weights are shared, not copied)."""
    wrapped = []
    for w in layers:
        copy = SimpleNamespace(**{name: batch_linear(value) for name, value in vars(w).items()})
        copy.ops = RowOps(w.ops)
        copy.fused = None  # the one-call layer takes one sequence's token, not a batch's
        wrapped.append(copy)
    return wrapped


def stack_states(states) -> list[list[torch.Tensor]]:
    """Per layer, each state tensor of every sequence stacked: [B, *shape]."""
    return [[torch.stack(tensors) for tensors in zip(*layers)] for layers in zip(*(s.layers for s in states))]


def unstack_states(layers, batch: int) -> list[list[list[torch.Tensor]]]:
    """The reverse of stack_states: for each sequence, its own (contiguous) per-layer tensors."""
    return [[[t[b].clone() for t in layer] for layer in layers] for b in range(batch)]
