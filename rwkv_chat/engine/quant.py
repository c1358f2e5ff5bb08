"""Linear layers with one call interface, `linear(x) -> x @ W.T`, whatever the weight format.

Weights arrive in the checkpoint layout [out, in]. Quantizing happens once, at load.

On the CPU a single token (x of shape [1, in]) goes to the C kernels of `cpu_kernels` when they
are available: weights stream from memory once, fp32 accumulation, no per-call conversion.
Longer inputs (prefill) use torch's GEMMs: MKL for fp32, oneDNN for bf16, and for int8 an
int8 x int8 GEMM (VNNI) on activations quantized per token.

Layouts: "rows" keeps the checkpoint's [out, in] (a dot product per output); "cols" stores
[in, out] so that a single token only reads the rows of the inputs that are nonzero: the FFN's
value projection takes relu(k)^2, which is mostly zeros. "cols" is used only where the kernels
run (CPU); elsewhere every linear is "rows".
"""
from __future__ import annotations

from array import array

import torch
import torch.nn.functional as F

from . import cpu_kernels, cuda, memory

_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT_MM = hasattr(torch, "_int_mm")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernels_for(device, dtype):
    if torch.device(device).type != "cpu" or dtype not in _KERNEL_DTYPES:
        return None
    return cpu_kernels.get()


def _flags(kind: int, layout: str, dtype: torch.dtype) -> int:
    flags = kind | (cpu_kernels.LAYOUT_COLS if layout == "cols" else 0)
    if dtype == torch.bfloat16:
        flags |= cpu_kernels.X_BF16 | cpu_kernels.Y_BF16
    return flags


class DenseLinear:
    """Float weights. `weight` is [out, in] ("rows") or [in, out] ("cols")."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device, layout: str = "rows"):
        self.dtype = dtype
        self.out_features, self.in_features = weight.shape
        kernels = _kernels_for(device, dtype)
        self.layout = layout if kernels is not None else "rows"
        # always a copy, never a view of the (memory-mapped) checkpoint
        self.weight = memory.converted(weight, dtype, transpose=self.layout == "cols").to(device)
        self._kernels = kernels
        if kernels is not None:
            kind = cpu_kernels.K_F32 if dtype == torch.float32 else cpu_kernels.K_BF16
            self._job = (self.weight.data_ptr(), 0, self.out_features, self.in_features, _flags(kind, self.layout, dtype), 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None and x.shape[0] == 1 and x.dtype == self.dtype and x.dim() == 2:
            return run_group(((self, x),))[0]
        if self.layout == "cols":
            return x @ self.weight
        return F.linear(x, self.weight)


class Int8Linear:
    """Weight-only int8: per-output-channel symmetric scales, W ~= q * scale[:, None].

    `q` is [out, in] ("rows") or [in, out] ("cols"); `scale` is [out] either way."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device, layout: str = "rows"):
        self.dtype = dtype
        self.out_features, self.in_features = weight.shape
        kernels = _kernels_for(device, dtype)
        self.layout = layout if kernels is not None else "rows"
        q, scale, rowsum = quantize_rows(weight, with_rowsum=True)
        self.q = (q.t() if self.layout == "cols" else q).contiguous().to(device)
        self.scale = scale.to(device)
        self._kernels = kernels
        self._cpu = self.q.device.type == "cpu"
        self._cuda = self.q.device.type == "cuda" and cuda.enabled()  # RWKV_CUDA_ON read once, here
        self._scale_bf16 = self.scale.to(torch.bfloat16) if (self._cpu and _HAS_INT8PACK) else None
        if kernels is not None:
            # the kernel needs every row's sum of q (the offset correction of its u8 x s8 products)
            self._rowsum = rowsum if self.layout == "rows" else None
            self._job = (self.q.data_ptr(), self.scale.data_ptr(), self.out_features, self.in_features,
                         _flags(cpu_kernels.K_I8, self.layout, dtype),
                         self._rowsum.data_ptr() if self._rowsum is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None and x.shape[0] == 1 and x.dtype == self.dtype and x.dim() == 2:
            return run_group(((self, x),))[0]
        if self._cpu:
            flat = x.reshape(-1, self.in_features)
            if _HAS_INT_MM and flat.shape[0] >= 16:
                w = self.q.t() if self.layout == "rows" else self.q
                if self._kernels is not None:
                    y = self._kernels.int8_gemm(flat.contiguous(), w, self.scale, x.dtype)
                else:
                    y = int8_gemm(flat, w, self.scale)
            elif _HAS_INT8PACK and self.layout == "rows":
                # aten's int8 weight kernel is fast with bf16 activations; int8 weights already
                # dominate the error, so the bf16 activation rounding costs nothing measurable.
                y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.q, self._scale_bf16)
            else:
                w = self.q.t() if self.layout == "rows" else self.q
                y = (flat.float() @ w.float()) * self.scale
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self._cuda:
            return cuda.int8_matmul(x, self.q, self.scale)
        return (x @ self.q.t().to(x.dtype)) * self.scale.to(x.dtype)


def quantize_rows(weight: torch.Tensor, with_rowsum: bool = False):
    """Symmetric per-row int8: (q, scale[, rowsum of q as int32]); a block of rows at a time to
    bound the float temporaries."""
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    rowsum = torch.empty(rows, dtype=torch.int32)
    for start, stop in memory.row_blocks(weight):
        block = weight[start:stop]
        w = block.float()
        memory.release(block)
        s = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        rounded = torch.round(w / s[:, None]).clamp_(-127, 127)
        q[start:stop] = rounded.to(torch.int8)
        scale[start:stop] = s
        if with_rowsum:
            rowsum[start:stop] = rounded.sum(dim=1).to(torch.int32)
    return (q, scale, rowsum) if with_rowsum else (q, scale)


def int8_gemm(x: torch.Tensor, q_in_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float times int8 weights given as [K, N] (a view is fine): activations are rounded
    to int8 per token (symmetric), multiplied in int32 (VNNI), then rescaled. Returns float32."""
    xf = x.float()
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
    xq = torch.round(xf / x_scale).to(torch.int8)
    return torch._int_mm(xq, q_in_out).float() * x_scale * scale


def run_group(pairs) -> list[torch.Tensor]:
    """[(linear, x), ...] -> [linear(x), ...]; single-token kernel linears share one parallel task.

    Linears the kernels cannot run (or inputs that are not one token) are simply called."""
    words: list[int] = []
    outputs, keep = [], []
    kernels = None
    for linear, x in pairs:
        job = getattr(linear, "_job", None)
        if job is None or linear._kernels is None or x.shape[0] != 1 or x.dtype != linear.dtype or x.dim() != 2:
            outputs.append(linear(x))
            continue
        if not x.is_contiguous():
            x = x.contiguous()
            keep.append(x)  # alive until the call returns
        y = torch.empty((1, job[2]), dtype=linear.dtype)
        words += (job[0], job[1], x.data_ptr(), y.data_ptr(), job[2], job[3], job[4], job[5])
        outputs.append(y)
        kernels = linear._kernels
    if words:
        kernels.gemv_words(array("q", words))
    return outputs


class StreamedLinear:
    """Weights kept in (pinned) host memory and copied to the compute device for every call."""

    def __init__(self, inner, device):
        self.inner = inner
        self.device = device
        for name in ("weight", "q", "scale"):
            tensor = getattr(inner, name, None)
            if tensor is not None:
                tensor = tensor.contiguous()
                if torch.cuda.is_available():
                    tensor = tensor.pin_memory()
                setattr(inner, name, tensor)
        self.copies = 0  # how many times weights crossed to the device (tests and stats read it)
        self._cuda = torch.device(device).type == "cuda" and cuda.enabled()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.copies += 1
        on_device = _moved(self.inner, self.device, self._cuda)
        return on_device(x)


def _moved(linear, device, use_cuda: bool):
    clone = object.__new__(type(linear))
    clone.__dict__.update(linear.__dict__)
    for name in ("weight", "q", "scale", "_scale_bf16"):
        tensor = getattr(linear, name, None)
        if tensor is not None:
            setattr(clone, name, tensor.to(device, non_blocking=True))
    on_cpu = torch.device(device).type == "cpu"
    clone._cpu = on_cpu
    clone._cuda = use_cuda
    if not on_cpu:
        clone._kernels = None  # streamed weights are "rows" (the inner linear was built for the host)
    elif getattr(clone, "_kernels", None) is not None:
        clone._job = (clone.q.data_ptr() if isinstance(clone, Int8Linear) else clone.weight.data_ptr(),
                      clone.scale.data_ptr() if isinstance(clone, Int8Linear) else 0, *linear._job[2:])  # rowsum stays
    if isinstance(clone, Int8Linear) and on_cpu and _HAS_INT8PACK and clone._scale_bf16 is None:
        clone._scale_bf16 = clone.scale.to(torch.bfloat16)
    return clone


def make_linear(weight: torch.Tensor, plan, device, scale: float = 1.0, layout: str = "rows"):
    """The linear layer a plan entry asks for. `scale` folds the fp16 rescale into the weight.

    layout="cols" marks a linear whose single-token input is mostly zeros (relu^2)."""
    if scale != 1.0:
        weight = weight.float() * scale
    home = "cpu" if plan.stream else device
    if plan.stream and torch.device(device).type != "cpu":
        layout = "rows"  # streamed to an accelerator: keep the plain layout
    if plan.int8:
        linear = Int8Linear(weight, plan.dtype, home, layout=layout)
    else:
        linear = DenseLinear(weight, plan.dtype, home, layout=layout)
    return StreamedLinear(linear, device) if plan.stream else linear
