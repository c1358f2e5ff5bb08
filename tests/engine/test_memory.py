"""Weight conversion a block of rows at a time, and the page releaser (engine/memory.py)."""
import sys
from pathlib import Path

import pytest
import torch

from rwkv_chat.engine import memory


@pytest.mark.parametrize("shape", [(1, 5), (3000, 700), (5, 300_000)])
@pytest.mark.parametrize("transpose", [False, True])
def test_converted_is_a_contiguous_copy_in_the_new_dtype(shape, transpose):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).to(torch.bfloat16)
    out = memory.converted(weight, torch.float32, transpose=transpose)
    expected = weight.float().t() if transpose else weight.float()
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, expected)
    same_dtype = memory.converted(weight, torch.bfloat16)
    assert torch.equal(same_dtype, weight) and same_dtype.data_ptr() != weight.data_ptr()


def test_row_blocks_cover_every_row_once_in_bounded_blocks():
    for rows, cols in [(1, 1), (65536, 768), (7, 3_000_000), (1000, 1)]:
        blocks = list(memory.row_blocks(torch.empty(rows, cols, dtype=torch.int8)))
        assert blocks[0][0] == 0 and blocks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all((stop - start) * cols <= max(cols, 1 << 20) for start, stop in blocks)


# ---------------------------------------------------------------------------------------------
# The page releaser: file pages of converted tensors leave the process's RSS, nothing else moves

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the page releaser works on Linux only")
ROWS, COLS = 1024, 4096  # 16 MiB of float32


def mapped_rss_kib(path: Path) -> int:
    """KiB of this process's RSS inside mappings of `path` (from /proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):  # a mapping's header line
                inside = len(fields) >= 6 and line.rstrip("\n").endswith(target)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def expected_weight() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).view(ROWS, COLS)


@pytest.fixture
def mapped_checkpoint(tmp_path):
    """(path, memory-mapped state dict) with every page of "weight" read once."""
    path = tmp_path / "weights.pth"
    torch.save({"weight": expected_weight(), "tiny": torch.ones(3)}, path)
    sd = torch.load(path, mmap=True, weights_only=True)
    assert torch.equal(sd["weight"], expected_weight())  # reads (maps in) every page
    return path, sd


@linux_only
def test_releasing_drops_the_file_pages_and_the_data_reads_back(mapped_checkpoint):
    path, sd = mapped_checkpoint
    weight = sd["weight"]
    size_kib = ROWS * COLS * 4 // 1024
    before = mapped_rss_kib(path)
    assert before >= size_kib * 0.9
    with memory.releasing(path) as releaser:
        assert releaser.ranges  # the mapping of this very file was found
        memory.release(weight[: ROWS // 2])
        half = mapped_rss_kib(path)
        memory.release(weight[ROWS // 2:])
        after = mapped_rss_kib(path)
    assert before - half >= size_kib * 0.45  # first half gone
    assert after <= size_kib * 0.05  # all of it gone (a partial page at each end may stay)
    assert torch.equal(weight, expected_weight())  # read again from the file: same numbers
    assert mapped_rss_kib(path) >= size_kib * 0.9


@linux_only
def test_release_does_nothing_outside_releasing_or_for_unsuitable_tensors(mapped_checkpoint):
    path, sd = mapped_checkpoint
    weight = sd["weight"]
    before = mapped_rss_kib(path)
    memory.release(weight)  # no `releasing` block: a no-op
    assert mapped_rss_kib(path) >= before * 0.95
    with memory.releasing(path):
        memory.release(weight.t())  # not contiguous: skipped
        memory.release(sd["tiny"])  # less than a page: nothing whole to drop
        assert mapped_rss_kib(path) >= before * 0.95


@linux_only
def test_release_never_touches_memory_that_is_not_the_files(mapped_checkpoint, tmp_path):
    """MADV_DONTNEED on anonymous memory would zero it: tensors of our own, and another file's
    mapping, must keep their values."""
    path, sd = mapped_checkpoint
    own = expected_weight()  # anonymous memory
    copy = sd["weight"].clone()
    other_path = tmp_path / "other.pth"
    torch.save({"weight": expected_weight()}, other_path)
    other = torch.load(other_path, mmap=True, weights_only=True)["weight"]
    assert torch.equal(other, own)
    other_before = mapped_rss_kib(other_path)
    with memory.releasing(path):
        for tensor in (own, copy, other):
            memory.release(tensor)
    assert torch.equal(own, expected_weight()) and torch.equal(copy, expected_weight())
    assert mapped_rss_kib(other_path) >= other_before * 0.95


@linux_only
def test_releasing_a_file_that_is_not_mapped_finds_no_ranges(tmp_path):
    path = tmp_path / "never-mapped.pth"
    path.write_bytes(b"x" * 10)
    own = expected_weight()
    with memory.releasing(path) as releaser:
        assert releaser.ranges == []
        memory.release(own)
    assert torch.equal(own, expected_weight())


# ---------------------------------------------------------------------------------------------
# The weight arena: big models' weights packed into memory advised to use 2 MiB pages

huge_pages = pytest.mark.skipif(not memory.huge_pages_available(),
                                reason="the kernel has no transparent huge pages (Linux, mode always or madvise)")


def mapping_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):
                start, end = (int(v, 16) for v in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@huge_pages
def test_empty_inside_packing_carves_tensors_from_huge_page_memory_one_after_another():
    shapes = [((300, 70), torch.float32), ((1001,), torch.int8), ((5, 3), torch.bfloat16),
              ((17_000_000,), torch.float32)]  # 68 MB: more than is left of the first 64 MiB mapping
    with memory.packing(memory.WeightArena()):
        placed = [memory.empty(shape, dtype) for shape, dtype in shapes]
    for (shape, dtype), tensor in zip(shapes, placed):
        assert tuple(tensor.shape) == shape and tensor.dtype == dtype and tensor.is_contiguous()
        assert tensor.data_ptr() % 64 == 0 and "hg" in mapping_flags(tensor.data_ptr())  # advised to use huge pages
    first = placed[0].data_ptr()
    assert first % (2 << 20) == 0  # a mapping starts on a 2 MiB boundary
    assert placed[1].data_ptr() == first + 84032  # packed: 300 * 70 * 4 = 84000 bytes, rounded up to 64
    assert placed[2].data_ptr() == first + 84032 + 1024  # 1001 bytes, rounded up to 64
    assert placed[3].data_ptr() % (2 << 20) == 0 and placed[3].data_ptr() != first  # a mapping of its own
    for tensor in placed:  # ordinary writable tensors, each in memory of its own
        tensor.fill_(3)
    assert all(bool((t == 3).all()) for t in placed)


@huge_pages
def test_packing_holds_for_the_thread_that_entered_it():
    """A model loading in a worker thread packs its weights; another thread's allocations meanwhile
    are ordinary ones."""
    import threading

    entered, done, seen = threading.Event(), threading.Event(), {}

    def loader():
        with memory.packing(memory.WeightArena()):
            entered.set()
            done.wait(10)
            seen["loader"] = memory.empty((8,), torch.float32)

    thread = threading.Thread(target=loader)
    thread.start()
    entered.wait(10)
    seen["other"] = memory.empty((8,), torch.float32)
    done.set()
    thread.join(10)
    assert "hg" in mapping_flags(seen["loader"].data_ptr()) and "hg" not in mapping_flags(seen["other"].data_ptr())


def test_empty_outside_packing_is_torch_empty():
    with memory.packing(None):
        tensor = memory.empty((4, 4), torch.bfloat16)
    assert tensor.shape == (4, 4) and tensor.dtype == torch.bfloat16 and "hg" not in mapping_flags(tensor.data_ptr())
    assert memory.arena_for(Path("/nonexistent/model.pth")) is None


@huge_pages
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16i8"])
@pytest.mark.parametrize("version", ["4", "7"])
def test_a_model_packed_into_the_arena_computes_what_an_unpacked_one_does(make_model_file, monkeypatch, version,
                                                                          strategy):
    from rwkv_chat import RWKV

    path = make_model_file(version)
    monkeypatch.setattr(memory, "ARENA_MIN_FILE", 1 << 62)
    assert memory.arena_for(path) is None
    plain = RWKV(path, strategy=strategy)
    monkeypatch.setattr(memory, "ARENA_MIN_FILE", 0)
    assert memory.arena_for(path) is not None
    packed = RWKV(path, strategy=strategy)
    head = packed.head.q if hasattr(packed.head, "q") else packed.head.weight
    assert "hg" in mapping_flags(head.data_ptr()) and "hg" not in mapping_flags(
        (plain.head.q if hasattr(plain.head, "q") else plain.head.weight).data_ptr())
    tokens = [0, 65535, 11, 261, 4000]
    expected, state = plain.forward(tokens, None)
    got, packed_state = packed.forward(tokens, None)
    assert torch.equal(got, expected)
    assert torch.equal(packed.forward([7], packed_state)[0], plain.forward([7], state)[0])  # the decode path too
