"""Picking a layer's backend at load time (see ops/__init__.py)."""
from __future__ import annotations

import torch

from .. import cpu_kernels
from .. import cuda as cuda_kernels
from . import cuda, torch_ref
from .cpu import CpuOps


def backend(device):
    """The backend for a layer placed on `device`: the C kernels on the CPU when they build, the
    CUDA kernels on a CUDA device with RWKV_CUDA_ON=1, else plain torch. Reads the switches now."""
    kind = torch.device(device).type
    if kind == "cpu":
        kernels = cpu_kernels.get()
        if kernels is not None:
            return CpuOps(kernels)
    elif kind == "cuda" and cuda_kernels.enabled():
        return cuda
    return torch_ref
