"""ChatRWKV strategy strings: parse them and assign every layer a device and dtypes.

Grammar: segments `DEVICE DTYPE[i8|i8a8|i4] [*N[+]]` joined by `->`.
There are n_layer + 1 slots; the last one holds ln_out and the head. `i8` / `i4` store that
slot's matrices (and, on the first slot, the embedding) as int8 / int4 in groups of 32 weights per
scale (quant.py); DTYPE stays the activation dtype. `i8a8` (CPU only) also rounds the inputs of
those int8 products to 8 bits per group of 32 where the GEMV kernels run them (decode, a server's
batches), as llama.cpp's Q8_0 does: twice the multiply-adds per instruction, for Q8_0's accuracy
instead of `i8`'s closer one (quant.py).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..errors import StrategyError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SEGMENT = re.compile(
    r"^(?P<device>cpu|cuda(?::\d+)?|mps|dml)\s+(?P<dtype>fp32|fp16|bf16)(?P<quant>i\d+)?(?P<act8>a8)?"
    r"(?:\s+\*(?P<count>\d+)(?P<stream>\+)?)?$"
)


@dataclass(frozen=True)
class Segment:
    device: str  # "cpu", "cuda", "cuda:1", "mps", "dml"
    dtype: torch.dtype  # activation dtype (and weight dtype unless int8)
    quant: int  # weight bits: 0 (DTYPE weights), 8 (i8) or 4 (i4)
    act8: bool  # i8a8: the int8 products' inputs rounded to 8 bits per group
    count: int | None  # slots asked for with *N, None when absent
    stream: bool  # *N+ : keep N slots resident, stream the rest through this device
    text: str


@dataclass(frozen=True)
class LayerPlan:
    device: str
    dtype: torch.dtype  # the activations' (placement.cpu_activations may widen bf16 to fp32)
    quant: int  # 0, 8 or 4 (Segment.quant)
    stream: bool
    weights: torch.dtype | None = None  # the float matrices' dtype when it is not `dtype`
    act8: bool = False  # Segment.act8

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype matrices are stored in (i8 / i4: expanded to for prefill's GEMMs)."""
        return self.weights or self.dtype

    def describe(self) -> str:
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.weight_dtype]
        quant = f"i{self.quant}{'a8' if self.act8 else ''}" if self.quant else ""
        return f"{self.device} {name}{quant}{' (streamed)' if self.stream else ''}"


def parse_strategy(text: str) -> list[Segment]:
    if not isinstance(text, str):
        raise StrategyError(f"strategy must be a string such as 'cpu fp32', got {type(text).__name__} {text!r}")
    if not text.strip():
        raise StrategyError(f"strategy {text!r} is empty; try 'cpu fp32' or 'cuda fp16'")
    segments = []
    for raw in text.split("->"):
        part = " ".join(raw.split())
        match = _SEGMENT.match(part)
        if match is None:
            raise StrategyError(f"strategy {text!r}: cannot read segment {part!r}; {_explain(part)}")
        quant = match["quant"]
        if quant not in (None, "i8", "i4"):
            raise StrategyError(
                f"strategy {text!r}: segment {part!r} asks for {quant} weights, which are not supported; "
                "use i8 (int8, ~8.5 bits per weight) or i4 (int4, ~4.5 bits per weight)"
            )
        if match["act8"] and quant != "i8":
            raise StrategyError(
                f"strategy {text!r}: segment {part!r}: a8 (8-bit product inputs) goes with int8 weights only, "
                f"as in '{match['device']} {match['dtype']}i8a8'"
            )
        if match["act8"] and match["device"] != "cpu":
            raise StrategyError(f"strategy {text!r}: segment {part!r}: i8a8 runs on the CPU only; use i8 on {match['device']}")
        count = match["count"]
        segments.append(
            Segment(
                device=match["device"],
                dtype=DTYPES[match["dtype"]],
                quant=0 if quant is None else int(quant[1:]),
                act8=match["act8"] is not None,
                count=None if count is None else int(count),
                stream=match["stream"] is not None,
                text=part,
            )
        )
    if sum(s.stream for s in segments) > 1:
        raise StrategyError(f"strategy {text!r}: only one segment may stream layers (*N+)")
    return segments


def _explain(part: str) -> str:
    words = part.split()
    if not words:
        return "a segment is empty (check the '->' separators)"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|dml", words[0]):
        return f"unknown device {words[0]!r} (expected cpu, cuda, cuda:N, mps or dml)"
    if len(words) < 2:
        return "the dtype is missing (expected fp32, fp16 or bf16, optionally with i8, i8a8 or i4)"
    if not re.fullmatch(r"(fp32|fp16|bf16)(i\d+(a8)?)?", words[1]):
        return f"unknown dtype {words[1]!r} (expected fp32, fp16 or bf16, optionally with i8, i8a8 or i4)"
    if len(words) > 3 or not re.fullmatch(r"\*\d+\+?", words[2]):
        return f"unexpected {' '.join(words[2:])!r} (expected '*N' or '*N+' with N a whole number)"
    return "expected 'DEVICE DTYPE [*N[+]]'"


def plan_layers(segments: list[Segment], n_layer: int) -> list[LayerPlan]:
    """Assign the n_layer + 1 slots to segments with ChatRWKV's allocation rules."""
    total = n_layer + 1
    sizes = [0] * len(segments)
    stream_index = next((i for i, s in enumerate(segments) if s.stream), None)
    allocated = 0
    free_segments = 0
    for i, seg in enumerate(segments):
        if seg.count is None:
            free_segments += 1
            continue
        sizes[i] = seg.count
        allocated += seg.count
        if allocated >= total:  # clamp; later segments get nothing
            sizes[i] -= allocated - total
            allocated = total
            break
    streamed = 0
    if stream_index is None:
        for i, seg in enumerate(segments):
            if seg.count is None and free_segments and allocated < total:
                sizes[i] = (total - allocated) // free_segments
                allocated += sizes[i]
                free_segments -= 1
        sizes[-1] += total - allocated
    else:
        streamed = total - allocated
        sizes[stream_index] += streamed

    plan: list[LayerPlan] = []
    for i, (seg, size) in enumerate(zip(segments, sizes)):
        first_streamed = size - streamed if i == stream_index else size
        for j in range(size):
            plan.append(LayerPlan(seg.device, seg.dtype, seg.quant, stream=j >= first_streamed, act8=seg.act8))
    # The head slot stays resident: streaming applies to the blocks only.
    last = plan[-1]
    plan[-1] = dataclasses.replace(last, stream=False)
    return plan
