"""Strategy grammar and ChatRWKV's slot allocation (examples from REFERENCE.md)."""
import itertools

import pytest
import torch

from rwkv_chat.engine.strategy import parse_strategy, plan_layers
from rwkv_chat.errors import StrategyError


def runs(strategy: str, n_layer: int = 24) -> list[tuple[str, int]]:
    plan = plan_layers(parse_strategy(strategy), n_layer)
    assert len(plan) == n_layer + 1
    return [(key.describe(), len(list(group))) for key, group in itertools.groupby(plan)]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("cpu fp32", [("cpu fp32", 25)]),
        ("cuda fp16i8 *10 -> cuda fp16", [("cuda fp16i8", 10), ("cuda fp16", 15)]),
        ("cuda:0 fp16 -> cuda:1 fp16", [("cuda:0 fp16", 12), ("cuda:1 fp16", 13)]),
        # *N+ keeps N resident and streams every unallocated block; later segments get nothing;
        # the head slot itself stays resident.
        ("cuda fp16 *10+ -> cpu fp32", [("cuda fp16", 10), ("cuda fp16 (streamed)", 14), ("cuda fp16", 1)]),
        ("cuda fp16i8 *20+", [("cuda fp16i8", 20), ("cuda fp16i8 (streamed)", 4), ("cuda fp16i8", 1)]),
        # *N beyond the total is clamped and later segments get nothing
        ("cuda fp16 *30 -> cpu fp32", [("cuda fp16", 25)]),
        # free segments share the remainder in order, leftovers to the last
        ("cuda fp16 -> cpu fp32 *3 -> cuda:1 bf16", [("cuda fp16", 11), ("cpu fp32", 3), ("cuda:1 bf16", 11)]),
        ("cuda fp16i8 *20 -> cuda fp16", [("cuda fp16i8", 20), ("cuda fp16", 5)]),
        # int4 weights, alone and mixed per layer with int8 and float layers
        ("cpu bf16i4", [("cpu bf16i4", 25)]),
        ("cpu bf16i4 *8 -> cpu bf16i8", [("cpu bf16i4", 8), ("cpu bf16i8", 17)]),
        ("cpu fp32i8 *4 -> cpu fp32i4 *4 -> cpu fp32", [("cpu fp32i8", 4), ("cpu fp32i4", 4), ("cpu fp32", 17)]),
        ("cuda fp16i4 *20+", [("cuda fp16i4", 20), ("cuda fp16i4 (streamed)", 4), ("cuda fp16i4", 1)]),
        # int8 with 8-bit product inputs, per layer like the rest
        ("cpu bf16i8a8", [("cpu bf16i8a8", 25)]),
        ("cpu fp32i8a8 *6 -> cpu fp32i8", [("cpu fp32i8a8", 6), ("cpu fp32i8", 19)]),
        ("cpu bf16i8a8 *20+", [("cpu bf16i8a8", 20), ("cpu bf16i8a8 (streamed)", 4), ("cpu bf16i8a8", 1)]),
    ],
)
def test_allocation_matches_chatrwkv(strategy, expected):
    assert runs(strategy) == expected


def test_whitespace_and_dtypes_are_read():
    (seg,) = parse_strategy("  cuda:1   bf16i8   *7+ ")
    assert (seg.device, seg.dtype, seg.quant, seg.count, seg.stream) == ("cuda:1", torch.bfloat16, 8, 7, True)
    assert [s.quant for s in parse_strategy("cpu fp32 -> cpu fp32i8 -> cuda fp16i4")] == [0, 8, 4]


@pytest.mark.parametrize(
    "strategy, fragment",
    [
        ("", "empty"),
        ("gpu fp16", "unknown device 'gpu'"),
        ("cuda fp8", "unknown dtype 'fp8'"),
        ("cuda", "dtype is missing"),
        ("cuda fp16 *x", "'*x'"),
        ("cuda fp16 20", "'20'"),
        ("cuda fp16i2", "i2 weights, which are not supported; use i8 (int8, ~8.5 bits per weight) or i4"),
        ("cpu fp32i3", "i3 weights"),
        ("cpu fp32q4", "optionally with i8, i8a8 or i4"),
        ("cpu bf16i4a8", "a8 (8-bit product inputs) goes with int8 weights only, as in 'cpu bf16i8a8'"),
        ("cpu fp32a8", "goes with int8 weights only"),
        ("cuda fp16i8a8", "i8a8 runs on the CPU only; use i8 on cuda"),
        ("cpu bf16i8a4", "unknown dtype 'bf16i8a4'"),
        ("cpu fp32 ->", "segment is empty"),
        ("cuda fp16 *2+ -> cpu fp32 *1+", "only one segment may stream"),
    ],
)
def test_malformed_strategy_quotes_the_string(strategy, fragment):
    with pytest.raises(StrategyError) as info:
        parse_strategy(strategy)
    assert fragment in str(info.value)
    assert repr(strategy) in str(info.value)
    assert isinstance(info.value, ValueError)
