"""Where each layer lives: device checks, environment switches, the fp16 rescale rule."""
from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import DeviceUnavailableError, StrategyError
from . import cpu_kernels
from .strategy import LayerPlan


def env_flag(name: str) -> bool:
    """RWKV_JIT_ON / RWKV_CUDA_ON / RWKV_DML_ON: '1' means on; unset or anything else means off."""
    return os.environ.get(name, "").strip() == "1"


def rescale_every(strategy_text: str, version: str) -> int:
    """How often (in layers) x is halved to keep fp16 from overflowing; 0 = never.

    v4-v6 only (v7 needs none). Default 6 when any segment runs fp16; RWKV_RESCALE_LAYER overrides.
    """
    if version == "7":
        return 0
    value = os.environ.get("RWKV_RESCALE_LAYER", "").strip()
    if value:
        if not value.isdigit():
            raise StrategyError(f"RWKV_RESCALE_LAYER={value!r} is not a whole number >= 0")
        return int(value)
    return 6 if "fp16" in strategy_text else 0


def resolve_device(plan: LayerPlan, segment_text: str):
    """The torch device for a plan entry, or DeviceUnavailableError naming the segment."""
    name = plan.device
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        index = int(name.split(":")[1]) if ":" in name else 0
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"strategy segment {segment_text!r} needs CUDA, but this torch build "
                f"({torch.__version__}) sees no CUDA device; use 'cpu fp32' or 'cpu bf16'"
            )
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"strategy segment {segment_text!r} needs cuda:{index}, "
                f"but only {torch.cuda.device_count()} CUDA device(s) are present"
            )
        return torch.device("cuda", index)
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceUnavailableError(
                f"strategy segment {segment_text!r} needs Apple MPS, which this machine/torch build lacks"
            )
        return torch.device("mps")
    if name == "dml":
        try:
            import torch_directml  # type: ignore[import-not-found]
        except ImportError:
            raise DeviceUnavailableError(
                f"strategy segment {segment_text!r} needs DirectML: pip install 'rwkv-chat[directml]' "
                "(torch-directml, which pins torch 2.4.1) and set RWKV_DML_ON=1"
            ) from None
        return torch_directml.device()
    raise StrategyError(f"unknown device {name!r} in strategy segment {segment_text!r}")


def cpu_activations(plan: LayerPlan) -> LayerPlan:
    """A bf16 slot on the CPU computes in fp32 where the C kernels have SIMD tiles (AVX-512, or
    AVX2 + FMA): its matrices stay bf16 (or i8 / i4), and everything between products (the
    token-shift and WKV states included) is fp32. A single token (and up to quant.KERNEL_ROWS
    rows) multiplies its fp32 input as it is, with the weights widened to fp32: decode is bound
    by memory, so this costs nothing, and on a bf16 checkpoint (as RWKV models ship) `cpu bf16`
    decodes what `cpu fp32` does. Prompts' GEMMs round their input to bf16 and sum in fp32 where
    the CPU has AVX-512 BF16 (llama.cpp's BF16 arithmetic; the LoRA factors excepted:
    common.lora); elsewhere they are torch's fp32 GEMMs on the weights widened (or int8 / int4
    expanded to fp32) a block at a time: torch's bf16 products are slow there (`cpu bf16` prompts
    went from 26-30 to 480-630 tok/s on an AVX2 build, docs/benchmarks.md). The memory
    is the same as bf16 activations'; 1 - cosine against fp32 on a 512-token prompt went from
    2.4e-4 to 1.6e-5 (v6 0.4B) and from 1.3e-3 to 2.8e-5 (v7 0.4B); llama.cpp's BF16 gets 4.8e-5
    and 7.5e-4 (docs/benchmarks.md)."""
    if plan.device != "cpu" or plan.dtype != torch.bfloat16:
        return plan
    kernels = cpu_kernels.get()
    if kernels is None or not kernels.simd:
        return plan
    return dataclasses.replace(plan, dtype=torch.float32, weights=torch.bfloat16)
