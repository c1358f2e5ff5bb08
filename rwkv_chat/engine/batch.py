"""One decode step for B sequences at once (a server's continuous batch).

Every linear runs on the [B, C] matrix of the B current tokens, so the weights are read once per
step for all sequences. Where a layer runs in one C call (v6 / v7 on the CPU kernels), the batch
is one call too, and every row's arithmetic is the one its sequence gets alone: a batch changes
no result, not even the last bit. Elsewhere the layer norms, mixes and gates are row-wise anyway,
the token shift takes each row's own previous token (common.shifted / last_row with a [B, C]
prev), and the recurrences run one row at a time through the layer's own backend (`RowOps`), the
very call a single-token forward makes.

A one-call layer reads and writes each sequence's state tensors where they are; elsewhere batch
states are the per-sequence tensors stacked on a new first axis ([B, C], [B, H, N, N]).
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

    def layer(self, *args):
        return self.inner.layer(*args)  # the one-call layer takes the B rows and B sequences' states itself

    def v7_step(self, *args):
        return None  # the fused one-token steps are for one sequence: the torch math runs per row

    def group_norm_gate(self, out, g, w, dtype):
        rows = [self.inner.group_norm_gate(out[b:b + 1], g[b:b + 1], w, dtype) for b in range(out.shape[0])]
        return None if rows[0] is None else torch.cat(rows)


class KernelRows:
    """A kernel linear given up to quant.KERNEL_ROWS rows at a time, so that a batch of any size
    gets the GEMV kernel's per-row results rather than a GEMM's."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = quant.KERNEL_ROWS
        if x.dim() != 2 or x.shape[0] <= step:
            return self.inner(x)
        return torch.cat([self.inner(x[start:start + step]) for start in range(0, x.shape[0], step)])


def batch_linear(linear):
    """`linear` itself, or KernelRows over it when the C kernels run it."""
    return KernelRows(linear) if getattr(linear, "_job", None) is not None else linear


def batch_layers(layers) -> list[SimpleNamespace]:
    """Each prepared layer marked as taking B sequences' tokens, with its backend wrapped in RowOps
    and its kernel linears in KernelRows (the weights are shared, not copied)."""
    wrapped = []
    for w in layers:
        copy = SimpleNamespace(**{name: batch_linear(value) for name, value in vars(w).items()})
        copy.ops = RowOps(w.ops)
        copy.sequences = True  # block(): row b is one token of sequence b
        wrapped.append(copy)
    return wrapped


def layer_states(layers, states) -> list:
    """Per layer, the B sequences' states as that layer's batch step takes them: a one-call layer
    reads and writes each sequence's own tensors (a list of them), the others take them stacked
    ([B, *shape])."""
    out = []
    for i, w in enumerate(layers):
        rows = [s.layers[i] for s in states]
        out.append(rows if w.fused is not None else [torch.stack(tensors) for tensors in zip(*rows)])
    return out


def sequence_states(layers, new_layers, batch: int) -> list[list[list[torch.Tensor]]]:
    """The reverse of layer_states: for each sequence, its own (contiguous) per-layer tensors."""
    per_layer = [layer if w.fused is not None else [[t[b].clone() for t in layer] for b in range(batch)]
                 for w, layer in zip(layers, new_layers)]
    return [[layer[b] for layer in per_layer] for b in range(batch)]
