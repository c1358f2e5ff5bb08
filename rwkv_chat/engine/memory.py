"""Where converted weights live, and keeping peak memory down while a checkpoint is converted
(Linux; a no-op elsewhere).

The checkpoint is memory-mapped; every page read while converting stays in this process's RSS
until the mapping goes away, which would put the whole file on top of the converted weights.
`PageReleaser` drops the pages of tensors (or row blocks of them) already converted, and
`release_freed_memory` hands the allocator's freed pages back to the system.

A decode step reads every weight once, so the weights of a large model are packed into memory
backed by 2 MiB pages (`WeightArena`): with 4 KiB pages a 0.1B model's token touches ~35,000 of
them, and their page walks cost 8% of its decode time (measured, docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
import threading
from pathlib import Path

import torch

_MADV_DONTNEED = 4
_BLOCK_ELEMENTS = 1 << 20  # elements converted at a time: 4 MiB of fp32 temporaries, whatever the width
_HUGE_PAGE = 2 << 20
_ARENA_CHUNK = 64 << 20  # bytes an arena maps at a time (virtual; pages are resident once written)
ARENA_MIN_FILE = 64 << 20  # checkpoints smaller than this keep ordinary allocations
_active: "PageReleaser | None" = None
_packing = threading.local()  # .arena: the WeightArena `empty` carves from in this thread (loads may run in workers)


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
    out = empty((cols, rows) if transpose else (rows, cols), dtype)
    for start, stop in row_blocks(weight):
        block = weight[start:stop]
        if transpose:
            out[:, start:stop] = block.t()
        else:
            out[start:stop] = block
        release(block)
    return out


def huge_pages_available() -> bool:
    """Whether the kernel gives 2 MiB pages to memory that asks for them (transparent huge pages
    in "always" or "madvise" mode)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


class WeightArena:
    """Tensors carved out of anonymous mappings advised to use 2 MiB pages, packed one after
    another (64-byte aligned) so the pages are shared and nothing but the last page's tail is
    wasted. A mapping lives as long as any tensor carved from it."""

    def __init__(self):
        self._chunk: torch.Tensor | None = None
        self._used = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            self._map(max(_ARENA_CHUNK, nbytes))
        tensor = self._chunk[self._used:self._used + nbytes].view(dtype).view(shape)
        self._used = -(-(self._used + nbytes) // 64) * 64
        return tensor

    def _map(self, nbytes: int) -> None:
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        # private (a shared anonymous mapping is shmem, which has huge pages only where the kernel's
        # shmem setting allows); one page more: the start is moved to a 2 MiB boundary
        mapping = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
        start = -whole.data_ptr() % _HUGE_PAGE
        self._chunk, self._used = whole[start:start + size], 0


def arena_for(path: Path) -> "WeightArena | None":
    """An arena for the weights of a checkpoint big enough to gain from huge pages, where the kernel
    has them; None otherwise."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return None
    return WeightArena() if size >= ARENA_MIN_FILE and huge_pages_available() else None


@contextlib.contextmanager
def packing(arena: "WeightArena | None"):
    """Within the block, `empty` carves weights out of `arena` (None: ordinary allocations). Only
    for weights that stay in host memory: an arena gives no memory back while any of its tensors
    lives."""
    previous = getattr(_packing, "arena", None)
    _packing.arena = arena
    try:
        yield arena
    finally:
        _packing.arena = previous


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) for a converted weight: in the arena inside `packing`."""
    arena = getattr(_packing, "arena", None)
    return torch.empty(shape, dtype=dtype) if arena is None else arena.empty(tuple(shape), dtype)
