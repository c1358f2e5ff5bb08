"""Linear layers with one call interface, `linear(x) -> x @ W.T`, whatever the weight format.

Weights arrive in the checkpoint layout [out, in]. Quantizing happens once, at load.
"""
from __future__ import annotations

import torch

_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


class DenseLinear:
    """Float weights stored [in, out] so a single token is one contiguous `x @ W` pass."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device):
        self.weight = weight.to(dtype).t().contiguous().to(device)
        self.in_features, self.out_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]


class Int8Linear:
    """Weight-only int8: per-output-channel symmetric scales, W ~= q * scale[:, None]."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device):
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous().to(device)
        self.scale = scale.to(device)
        self.dtype = dtype
        self.out_features, self.in_features = self.q.shape
        self._cpu_kernel = _HAS_INT8PACK and self.q.device.type == "cpu"
        self._scale_bf16 = self.scale.to(torch.bfloat16) if self._cpu_kernel else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu_kernel:
            # aten's int8 weight kernel is fast with bf16 activations; int8 weights already
            # dominate the error, so the bf16 activation rounding costs nothing measurable.
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self._scale_bf16)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return (x @ self.q.t().to(x.dtype)) * self.scale.to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.copies += 1
        on_device = _moved(self.inner, self.device)
        return on_device(x)

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()


def _moved(linear, device):
    clone = object.__new__(type(linear))
    clone.__dict__.update(linear.__dict__)
    for name in ("weight", "q", "scale", "_scale_bf16"):
        tensor = getattr(linear, name, None)
        if tensor is not None:
            setattr(clone, name, tensor.to(device, non_blocking=True))
    if isinstance(clone, Int8Linear):
        clone._cpu_kernel = _HAS_INT8PACK and torch.device(device).type == "cpu"
        if clone._cpu_kernel and clone._scale_bf16 is None:
            clone._scale_bf16 = clone.scale.to(torch.bfloat16)
    return clone


def make_linear(weight: torch.Tensor, plan, device, scale: float = 1.0):
    """The linear layer a plan entry asks for. `scale` folds the fp16 rescale into the weight."""
    if scale != 1.0:
        weight = weight.float() * scale
    if plan.int8:
        linear = Int8Linear(weight, plan.dtype, "cpu" if plan.stream else device)
    else:
        linear = DenseLinear(weight, plan.dtype, "cpu" if plan.stream else device)
    return StreamedLinear(linear, device) if plan.stream else linear
