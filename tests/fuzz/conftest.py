"""Fuzzing toolkit: hypothesis settings sized by RWKV_FUZZ_EXAMPLES, a hang guard, and mutations of
tensor dicts and of file bytes shared by the per-format fuzz tests (see docs/fuzzing.md)."""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from rwkv_chat.engine import memory
from rwkv_chat.errors import RWKVChatError

EXAMPLES_ENV = "RWKV_FUZZ_EXAMPLES"
HANG_SECONDS = 20.0  # RWKV() turns on flush-denormal for the process: floats below use allow_subnormal=False
"""A case that runs this long counts as a hang (SIGALRM interrupts it)."""


def fuzz_settings(default: int) -> settings:
    """`default` examples (deterministic), or RWKV_FUZZ_EXAMPLES of them (random) when set."""
    wanted = os.environ.get(EXAMPLES_ENV, "").strip()
    return settings(max_examples=int(wanted) if wanted else default, derandomize=not wanted, database=None,
                    deadline=timedelta(seconds=HANG_SECONDS / 2), suppress_health_check=list(HealthCheck),
                    print_blob=True)


class Hang(BaseException):
    """Raised inside a case that did not finish in time (a BaseException: no `except Exception`
    in the code under test can swallow it)."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


OUTCOMES: Counter = Counter()
"""(test name, "worked" | "refused") -> cases, for the summary line of each fuzz run."""
STARTED = time.process_time()


def loads_or_our_error(action) -> bool:
    """Run `action()`; True when it worked, False when it raised RWKVChatError. Any other
    exception, or a hang, fails the case."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    with no_hang():
        try:
            action()
        except RWKVChatError:
            OUTCOMES[test, "refused"] += 1
            return False
    OUTCOMES[test, "worked"] += 1
    return True


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    tests = sorted({test for test, _ in OUTCOMES})
    terminalreporter.section("fuzz cases (worked / refused with our error)")
    for test in tests:
        terminalreporter.write_line(f"{test}: {OUTCOMES[test, 'worked']} / {OUTCOMES[test, 'refused']}")
    terminalreporter.write_line(f"process CPU time: {time.process_time() - STARTED:.1f} s")


@pytest.fixture(scope="module", autouse=True)
def _fast_and_single_threaded():
    """Thousands of loads: skip the allocator hygiene (gc.collect + malloc_trim per load, ~0.1 s,
    which changes nothing that is checked) and use one thread (the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "release_freed_memory", lambda collect=True: None)
        yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ tensor-dict mutations
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]
POISON = [float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 0.0]

small_shape = st.lists(st.integers(0, 70), min_size=0, max_size=5).map(lambda dims: _capped(dims))
junk_key = st.one_of(st.text(max_size=24), st.integers(-3, 10), st.none(), st.booleans(), st.tuples(st.integers()))
junk_value = st.one_of(st.integers(), st.floats(allow_subnormal=False), st.text(max_size=8), st.none(), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

tensor_op = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 999)),
    st.tuples(st.just("rename"), st.integers(0, 999), junk_key),
    st.tuples(st.just("move"), st.integers(0, 999), st.integers(-1, 4)),  # same suffix, another layer number
    st.tuples(st.just("value"), st.integers(0, 999), junk_value),
    st.tuples(st.just("shape"), st.integers(0, 999), small_shape, st.sampled_from(DTYPES)),
    st.tuples(st.just("dtype"), st.integers(0, 999), st.sampled_from(DTYPES)),
    st.tuples(st.just("poison"), st.integers(0, 999), st.sampled_from(POISON), st.integers(0, 10**6)),
    st.tuples(st.just("axes"), st.integers(0, 999), st.sampled_from(["unsqueeze", "flatten", "transpose", "half",
                                                                       "sparse", "expand", "scalar", "huge",
                                                                       "meta"])),
    st.tuples(st.just("add"), junk_key, small_shape),
)


def _capped(dims: list[int], most: int = 1 << 16) -> list[int]:
    """Drop trailing axes until the tensor has at most `most` elements (keeps memory small)."""
    dims = list(dims)
    while dims and torch.Size(dims).numel() > most:
        dims.pop()
    return dims


def _as_block_key(key, layer: int):
    parts = str(key).split(".")
    return ".".join(["blocks", str(layer), *parts[2:]]) if len(parts) > 2 else f"blocks.{layer}.{key}"


def mutate_tensors(base: dict, ops: list) -> dict:
    """A mutated copy of a tensor dict (base is left alone)."""
    out = dict(base)
    for op in ops:
        keys = list(out)
        if op[0] == "add":
            out[op[1]] = torch.zeros(op[2])
            continue
        if not keys:
            break
        key = keys[op[1] % len(keys)]
        value = out[key]
        kind = op[0]
        if kind == "drop":
            del out[key]
        elif kind == "rename":
            out[op[2]] = out.pop(key)
        elif kind == "move":
            out[_as_block_key(key, op[2])] = out.pop(key)
        elif kind == "value":
            out[key] = op[2]
        elif kind == "shape":
            out[key] = torch.ones(op[2]).to(op[3])
        elif not isinstance(value, torch.Tensor) or value.layout != torch.strided or _not_editable(value):
            continue
        elif kind == "dtype":
            out[key] = value.to(op[2])
        elif kind == "poison" and value.numel() and value.is_floating_point():
            value = value.contiguous().clone()
            value.view(-1)[op[3] % value.numel()] = op[2]
            out[key] = value
        elif kind == "axes":
            out[key] = _reshaped(value, op[2])
    return out


def _not_editable(value: torch.Tensor) -> bool:
    """A meta or float8 tensor (few torch kernels take them), or one claiming more elements than it
    stores (`_reshaped` "huge"): editing it further would fail, or allocate all it claims, in the
    test itself."""
    if value.is_meta or value.dtype == torch.float8_e4m3fn:
        return True
    return value.numel() > value.untyped_storage().nbytes() // value.element_size()


def _reshaped(value: torch.Tensor, how: str) -> torch.Tensor:
    if how == "unsqueeze":
        return value.unsqueeze(0)
    if how == "flatten":
        return value.reshape(-1)
    if how == "transpose":
        return value.transpose(0, -1) if value.dim() > 1 else value
    if how == "half":
        return value[: max(0, value.shape[0] // 2)] if value.dim() else value
    if how == "sparse":
        return value.to_sparse() if value.dim() else value
    if how == "expand":  # stride-0 view
        return value.reshape(-1)[:1].expand(value.numel()) if value.numel() else value
    if how == "huge":  # 2^40 elements claimed over the one value the file stores
        return value.reshape(-1)[:1].clone().as_strided((1 << 40,), (0,)) if value.numel() else value
    if how == "meta":  # a shape without data
        return value.to("meta")
    return value.reshape(-1)[0] if value.numel() else value  # scalar


# ------------------------------------------------------------------ byte mutations
_FRACTION = st.integers(0, 999_999).map(lambda n: n / 1_000_000)  # where in the file, in [0, 1)
byte_op = st.one_of(
    st.tuples(st.just("set"), _FRACTION, st.integers(0, 255)),
    st.tuples(st.just("truncate"), _FRACTION),
    st.tuples(st.just("insert"), _FRACTION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _FRACTION, st.integers(1, 64)),
)


def mutate_bytes(data: bytes, ops: list) -> bytes:
    buffer = bytearray(data)
    for op in ops:
        if not buffer:
            break
        at = int(op[1] * len(buffer))
        if op[0] == "set":
            buffer[at] = op[2]
        elif op[0] == "truncate":
            del buffer[at:]
        elif op[0] == "insert":
            buffer[at:at] = op[2]
        else:
            del buffer[at:at + op[2]]
    return bytes(buffer)
