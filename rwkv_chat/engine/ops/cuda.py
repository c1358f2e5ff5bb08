"""The CUDA backend (engine/cuda.py, sources in kernels/): the WKV kernels, each falling back to the
torch twin when its build fails. Same functions and layouts as torch_ref."""
from __future__ import annotations

from .. import cuda
from .torch_ref import group_norm_gate, prepare_v6_layer, prepare_v7_layer, v7_step  # noqa: F401 (no fused single-token steps)

NAME = "cuda kernels"
kernels = None
wkv4 = cuda.wkv4
wkv5 = cuda.wkv5
wkv7 = cuda.wkv7
