"""Weight conversion a block of rows at a time (engine/memory.py)."""
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
