"""Keeping peak memory down while a checkpoint is converted (Linux; a no-op elsewhere).

The checkpoint is memory-mapped; every page read while converting stays in this process's RSS
until the mapping goes away, which would put the whole file on top of the converted weights.
`PageReleaser` drops the pages of tensors (or row blocks of them) already converted, and
`release_freed_memory` hands the allocator's freed pages back to the system.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = 4
_BLOCK_ELEMENTS = 1 << 20  # elements converted at a time: 4 MiB of fp32 temporaries, whatever the width
_active: "PageReleaser | None" = None


class PageReleaser:
    """madvise(MADV_DONTNEED) on whole pages of converted tensors, but only inside ranges that
    /proc/self/maps shows as mapped from the checkpoint file itself: on a clean file mapping that
    just unmaps the pages (a later read faults them back in from the page cache), while anonymous
    memory is never touched."""

    def __init__(self, path: Path):
        self.ranges: list[tuple[int, int]] = []
        self.libc = None
        if not sys.platform.startswith("linux"):
            return
        try:
            import ctypes

            target = str(Path(path).resolve())
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].strip() == target:
                        start, end = (int(v, 16) for v in parts[0].split("-"))
                        self.ranges.append((start, end))
            if self.ranges:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.page = os.sysconf("SC_PAGE_SIZE")
                self.libc = libc
        except (OSError, ValueError, AttributeError):
            self.ranges, self.libc = [], None

    def release(self, tensor: torch.Tensor) -> None:
        if self.libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        first = -(-start // self.page) * self.page  # whole pages inside the tensor only
        last = end // self.page * self.page
        if last > first:
            self.libc.madvise(first, last - first, _MADV_DONTNEED)


@contextlib.contextmanager
def releasing(path: Path):
    """Within the block, `release(t)` drops the file pages of checkpoint tensor `t`."""
    global _active
    previous, _active = _active, PageReleaser(path)
    try:
        yield _active
    finally:
        _active = previous


def release(tensor: torch.Tensor) -> None:
    """Done with this (part of a) checkpoint tensor: let its file pages go (no-op outside `releasing`)."""
    if _active is not None:
        _active.release(tensor)


def release_freed_memory(collect: bool = True) -> None:
    """Give the allocator's freed pages back to the system (glibc keeps them otherwise)."""
    if collect:
        import gc

        gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def row_blocks(tensor: torch.Tensor):
    """(start, stop) row ranges of a 2-D tensor, about a million elements each."""
    rows, cols = tensor.shape
    step = max(1, _BLOCK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def converted(weight: torch.Tensor, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
    """A contiguous copy of a 2-D checkpoint tensor in `dtype` (transposed when asked), made a block
    of rows at a time, each block's file pages dropped once copied: the file is never resident
    next to the whole copy."""
    rows, cols = weight.shape
    out = torch.empty((cols, rows) if transpose else (rows, cols), dtype=dtype)
    for start, stop in row_blocks(weight):
        block = weight[start:stop]
        if transpose:
            out[:, start:stop] = block.t()
        else:
            out[start:stop] = block
        release(block)
    return out
