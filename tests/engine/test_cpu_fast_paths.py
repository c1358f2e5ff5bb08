"""The CPU fast paths: C kernels (matrix-vector products, WKV recurrences), the chunked WKV of
v5.2/v6, and whole models with the kernels on vs off."""
import sys

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.engine import cpu_kernels
from rwkv_chat.engine.ops import torch_ref
from rwkv_chat.engine.quant import KERNEL_ROWS, DenseLinear, QuantLinear, run_group

from .conftest import VERSIONS

KERNELS = cpu_kernels.get()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the CPU kernels could not be built here (no C compiler?)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Matrix-vector kernels

SHAPES = [(768, 768), (3072, 768), (768, 3072), (101, 37), (7, 64), (513, 8200)]  # (out, in)


@needs_kernels
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_single_token_matches_matmul(out_features, in_features, layout, dtype):
    g = gen(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(1, in_features, generator=g)
    x[0, torch.rand(in_features, generator=g) < 0.5] = 0  # relu^2-like zeros (the cols layout skips them)
    x = x.to(dtype)
    linear = DenseLinear(weight, dtype, "cpu", layout=layout)
    assert linear.layout == layout
    got = linear(x)
    expected = x.double() @ weight.to(dtype).double().t()
    assert got.dtype == dtype and got.shape == (1, out_features)
    assert rel(got, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def plain_dequantize(linear) -> torch.Tensor:
    """QuantLinear's weights as float64, read the way its docstrings describe the format (a loop
    over groups and, for int4, over the nibble layout), independent of quant.py's own helpers."""
    out, n = linear.out_features, linear.in_features
    n32 = -(-n // 32) * 32
    w = torch.zeros(out, n32, dtype=torch.float64)
    q, scale = linear.rows_q(), linear.scale.double()
    for c in range(0, n32, 64):
        width = min(64, n32 - c)
        if linear.bits == 8:
            stop = min(c + width, n)
            w[:, c:stop] = q[:, c:stop].double()
        else:
            packed = q[:, c // 2:c // 2 + width // 2].long()
            w[:, c:c + width // 2] = (packed & 15).double() - 8
            w[:, c + width // 2:c + width] = (packed >> 4).double() - 8
    w = w * scale.repeat_interleave(32, dim=1)
    return w[:, :n]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_follow_the_group_rule(bits):
    """int8: q = round(w / s), s = the fp16 of the group's max |w| / 127 (bit-exact); int4: q in
    [-8, 7] with the group's largest |w| mapped exactly to -8 or another candidate, and the
    weight error near Q4_0's."""
    weight = torch.randn(37, 200, generator=gen(1))
    linear = QuantLinear(weight, torch.float32, "cpu", bits=bits)
    assert linear.scale.dtype == torch.float16 and linear.scale.shape == (37, 7)
    padded = torch.nn.functional.pad(weight, (0, 24)).view(37, 7, 32)
    if bits == 8:
        s = (padded.abs().amax(-1) / 127).half()
        assert torch.equal(linear.scale, s)
        want = torch.round(padded / s.float()[..., None]).clamp(-127, 127).view(37, -1)[:, :200].to(torch.int8)
        assert torch.equal(linear.rows_q(), want)
        assert rel(plain_dequantize(linear), weight) < 0.01
    else:
        assert linear.q.dtype == torch.uint8 and linear.rows_q().shape == (37, 112)
        error = (plain_dequantize(linear) - weight.double()).norm() / weight.double().norm()
        # plain Q4_0 (scale = signed max / -8) on the same weights, for comparison
        amax_signed = torch.gather(padded, -1, padded.abs().argmax(-1, keepdim=True))
        d = (amax_signed / -8).half().float()
        q40 = (torch.round(padded / d).clamp(-8, 7) * d).view(37, -1)[:, :200]
        assert error <= (q40 - weight).norm() / weight.norm() + 1e-6
        assert error < 0.1


@needs_kernels
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_single_token_matches_dequantized(out_features, in_features, bits, dtype):
    g = gen(3 * out_features + in_features + bits)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(1, in_features, generator=g)
    x[0, torch.rand(in_features, generator=g) < 0.3] = 0
    x[0, 3 % in_features] = 40.0  # an outlier: int16 activations (int8) must keep the small values
    x = x.to(dtype)
    linear = QuantLinear(weight, dtype, "cpu", bits=bits)
    expected = x.double() @ plain_dequantize(linear).t()
    got = linear(x)
    assert got.dtype == dtype and got.shape == (1, out_features)
    # int8: int16 activations, ~1e-5; int4: int8 activations per group of 32, ~1e-2 (as Q8_0)
    tolerance = {8: 1e-3, 4: 2e-2}[bits] if dtype == torch.float32 else 2e-2
    assert rel(got, expected) <= tolerance
    assert rel(got, x.double() @ weight.double().t()) <= {8: 0.05, 4: 0.3}[bits]


def rounded_per_group(x: torch.Tensor) -> torch.Tensor:
    """i8a8's product input, by a plain loop: each group of 32 values (a last one shorter) as
    round(v * (127 / m)) * (m / 127), m the group's max |v|, in float32; the result in float64."""
    out = x.double().clone()
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 32):
            group = x[r, c:c + 32].float()
            m = group.abs().max()
            if m > 0:
                out[r, c:c + 32] = torch.round(group * (127 / m)).double() * (m / 127).double()
    return out


@needs_kernels
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [True, False])  # False: a streamed layer's plain row order
def test_int8_with_8bit_inputs_rounds_each_group_of_the_input(out_features, in_features, dtype, blocks):
    """i8a8: the GEMV kernels' input (up to KERNEL_ROWS rows) is rounded to int8 per group of 32
    (Q8_0's rule), then the group sums are exact, so the result is the float64 product of the two
    roundings, each row bitwise as alone. A prompt (more rows) takes plain i8's GEMM."""
    g = gen(7 * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(KERNEL_ROWS + 5, in_features, generator=g)
    x[x < -1] = 0
    x[0, 3 % in_features] = 40.0
    x = x.to(dtype)
    linear = QuantLinear(weight, dtype, "cpu", bits=8, act8=True, blocks=blocks)
    assert linear.blocks == blocks
    got = linear(x[:KERNEL_ROWS])
    expected = rounded_per_group(x[:KERNEL_ROWS]) @ plain_dequantize(linear).t()
    assert got.dtype == dtype and got.shape == (KERNEL_ROWS, out_features)
    assert rel(got, expected) <= (1e-6 if dtype == torch.float32 else 1e-2)
    for b in (0, KERNEL_ROWS - 1):
        assert torch.equal(linear(x[b:b + 1])[0], got[b])
    plain_i8 = QuantLinear(weight, dtype, "cpu", bits=8)
    assert torch.equal(linear(x), plain_i8(x))
    # plain int8 rounds to int16 instead: closer to the float product
    plain = x[:KERNEL_ROWS].double() @ weight.double().t()
    assert rel(plain_i8(x[:KERNEL_ROWS]), plain) < rel(got, plain)


def test_int8_with_8bit_inputs_without_kernels_rounds_the_same_way(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    g = gen(17)
    weight = torch.randn(40, 100, generator=g) / 10
    x = torch.randn(3, 100, generator=g)
    linear = QuantLinear(weight, torch.float32, "cpu", bits=8, act8=True)
    assert linear._job is None
    assert rel(linear(x), rounded_per_group(x) @ plain_dequantize(linear).t()) <= 1e-6


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4, "8a8"])
def test_int4_and_int8_kernels_are_exact_on_integer_inputs(bits):
    """Activations that the kernels' rounding keeps exactly (int8 weights: integers up to 32767
    with the max present, as int16; int4 and i8a8: up to 127 with each group's max present, as
    int8): the group sums are exact integers, so the result equals the float64 product of the
    dequantized weights up to float32 rounding of the scaled sums."""
    act8 = bits == "8a8"
    g = gen(9 if act8 else bits)
    weight = torch.randn(64, 672, generator=g)  # two blocks of the kernels' storage order and a rest
    top = 32767 if bits == 8 else 127
    x = torch.randint(-top, top + 1, (1, 672), generator=g).float()
    x[0, ::32] = float(top)
    linear = QuantLinear(weight, torch.float32, "cpu", bits=8 if act8 else bits, act8=act8)
    expected = x.double() @ plain_dequantize(linear).t()
    assert rel(linear(x), expected) <= 1e-6


@needs_kernels
@pytest.mark.parametrize("make", ["dense", "cols", 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_few_rows_are_each_computed_as_alone(make, dtype):
    """Up to KERNEL_ROWS rows go to the GEMV kernels together (a server's batch): the weights are
    read once, and each row's result is bitwise the one it gets alone; a NaN row stays its own."""
    g = gen(11)
    weight = torch.randn(300, 800, generator=g) / 28
    if make in ("dense", "cols"):
        linear = DenseLinear(weight, dtype, "cpu", layout="rows" if make == "dense" else "cols")
    else:
        linear = QuantLinear(weight, dtype, "cpu", bits=make)
    x = torch.randn(KERNEL_ROWS, 800, generator=g)
    x[x < -1] = 0
    x[5, 7] = float("nan")
    x = x.to(dtype)
    together = linear(x)
    assert together.shape == (KERNEL_ROWS, 300)
    for rows in (3, KERNEL_ROWS):
        got = linear(x[:rows])
        for b in range(rows):
            alone = linear(x[b:b + 1])[0]
            assert torch.equal(got[b], alone) or (b == 5 and bool(got[b].isnan().all() and alone.isnan().all())), b
    assert bool(together[5].isnan().all()) and not bool(together[4].isnan().any())
    expected = x[:5].double() @ weight.to(dtype).double().t()
    assert rel(together[:5], expected) <= (0.3 if make == 4 else 0.05)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_multi_token_matches_dequantized(bits, dtype, monkeypatch):
    """Prefill: the C kernels expand the weights (a block of rows at a time) and torch multiplies;
    the activations are not rounded to 8 bits."""
    monkeypatch.setattr("rwkv_chat.engine.quant._DEQUANT_ELEMENTS", 100 * 256)  # several blocks
    g = gen(5 + bits)
    weight = torch.randn(300, 256, generator=g) / 16
    x = torch.randn(40, 256, generator=g).to(dtype)
    linear = QuantLinear(weight, dtype, "cpu", bits=bits)
    got = linear(x)
    expected = x.double() @ plain_dequantize(linear).t()
    assert got.shape == (40, 300) and got.dtype == dtype
    assert rel(got, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------
# bf16 weights under fp32 activations (placement.cpu_activations): the kernels' bf16 GEMM


def bf16_products(x: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """What the bf16 GEMM promises: x rounded to bf16, times the bf16 weights, summed exactly."""
    return x.bfloat16().double() @ weight_rows.bfloat16().double().t()


@needs_kernels
@pytest.mark.parametrize("T", [1, 5, 55, 200])
@pytest.mark.parametrize("out_features,in_features", [(768, 768), (101, 37), (7, 64), (130, 8200)])
@pytest.mark.parametrize("cols", [False, True])
def test_bf16_gemm_sums_bf16_products_in_fp32(T, out_features, in_features, cols):
    g = gen(T + out_features + in_features)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).bfloat16()
    x = torch.randn(T, in_features, generator=g)
    y = KERNELS.gemm_bf16(x, weight.t().contiguous() if cols else weight, cols=cols)
    expected = bf16_products(x, weight)
    assert y.dtype == torch.float32 and y.shape == (T, out_features)
    assert rel(y, expected) <= 1e-5
    # the results keep fp32 precision: rounding them to bf16 would be 100x further off
    assert rel(y.bfloat16(), expected) > 10 * rel(y, expected)


@needs_kernels
@pytest.mark.parametrize("layout,widen", [("rows", False), ("cols", False), ("rows", True)])
@pytest.mark.parametrize("rows", [1, KERNEL_ROWS, 40])
def test_bf16_weights_under_fp32_activations(layout, widen, rows):
    """A single token and a few rows (the GEMV kernels) multiply the fp32 input as it is by the
    bf16 weights; many rows (the GEMM) round it to bf16 first, unless widened (the LoRA factors).
    Results are fp32; the weight is stored once, in bf16."""
    g = gen(rows)
    weight = torch.randn(300, 256, generator=g) / 16
    linear = DenseLinear(weight, torch.float32, "cpu", layout=layout, weights=torch.bfloat16, widen=widen)
    assert linear.weight.dtype == torch.bfloat16
    x = torch.randn(rows, 256, generator=g)
    x[:, torch.rand(256, generator=g) < 0.5] = 0  # relu^2-like zeros (the cols layout skips them)
    got = linear(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 300)
    unrounded = widen or rows <= KERNEL_ROWS
    expected = x.double() @ weight.bfloat16().double().t() if unrounded else bf16_products(x, weight)
    assert rel(got, expected) <= 1e-5
    if unrounded:
        assert rel(got, bf16_products(x, weight)) > 10 * rel(got, expected)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_prefill_under_fp32_activations_expands_to_bf16(bits, monkeypatch):
    monkeypatch.setattr("rwkv_chat.engine.quant._DEQUANT_ELEMENTS", 100 * 256)  # several blocks
    g = gen(7 + bits)
    weight = torch.randn(300, 256, generator=g) / 16
    linear = QuantLinear(weight, torch.float32, "cpu", bits=bits, expand=torch.bfloat16)
    x = torch.randn(40, 256, generator=g)
    got = linear(x)
    assert got.dtype == torch.float32
    assert rel(got, bf16_products(x, plain_dequantize(linear).float())) <= 1e-5


def q4_0_squared_error(weight: torch.Tensor) -> float:
    """llama.cpp's Q4_0, written plainly: per 32 weights d = (the weight of largest magnitude) / -8
    in fp16, q = round(w / d) clamped to [-8, 7]; the summed squared error of q * d."""
    total = 0.0
    for group in weight.double().reshape(-1, 32):
        d = float(torch.tensor(float(group[group.abs().argmax()]) / -8).half())
        q = torch.zeros(32, dtype=torch.float64) if d == 0 else torch.round(group / d).clamp(-8, 7)
        total += float(((q * d - group) ** 2).sum())
    return total


def test_int4_weights_are_closer_than_q4_0():
    """The scale search plus a least-squares refit (quant._best_int4): ~11% less squared error
    than Q4_0 on Gaussian weights, never more."""
    weight = torch.randn(64, 1024, generator=gen(11)) * 0.02
    weight[3, :32] = 0  # an all-zero group stays exact
    weight[5, 40] = 1.0  # an outlier
    linear = QuantLinear(weight, torch.float32, "cpu", bits=4)
    ours = float(((plain_dequantize(linear) - weight.double()) ** 2).sum())
    assert ours <= 0.93 * q4_0_squared_error(weight)
    assert torch.all(plain_dequantize(linear)[3, :32] == 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_reference_path_without_kernels(bits, monkeypatch):
    """Without the C kernels (and off the CPU) the torch reference runs the same format."""
    monkeypatch.setattr(cpu_kernels, "get", lambda: None)
    weight = torch.randn(50, 96, generator=gen(9))
    linear = QuantLinear(weight, torch.float32, "cpu", bits=bits)
    assert linear._job is None
    x = torch.randn(3, 96, generator=gen(10))
    assert rel(linear(x), x.double() @ plain_dequantize(linear).t()) <= 1e-5
    assert rel(linear(x[:1]), x[:1].double() @ plain_dequantize(linear).t()) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", ["dense", 8, 4])
def test_a_non_finite_input_gives_nan_outputs(bad, layout, dtype, make):
    """A diverged activation must show, not be rounded into plausible numbers by the int paths."""
    weight = torch.randn(192, 256, generator=gen(5))
    if make == "dense":
        linear = DenseLinear(weight, dtype, "cpu", layout=layout)
    else:
        linear = QuantLinear(weight, dtype, "cpu", bits=make)
    x = torch.relu(torch.randn(1, 256, generator=gen(6))).square()
    x[0, 7] = bad
    assert torch.isnan(linear(x.to(dtype))).all()


@needs_kernels
def test_single_token_calls_hold_torch_at_one_thread_and_restore_it(engine_models, monkeypatch):
    """Decode runs torch's small ops on one thread while the kernels keep the configured count;
    the setting is restored after every call, also when it fails."""
    model = RWKV(engine_models["5.2", "three_heads"], "cpu bf16i8")
    seen = []
    original = KERNELS.gemv_words

    def spy(words):
        seen.append((torch.get_num_threads(), KERNELS.threads()))
        return original(words)

    monkeypatch.setattr(KERNELS, "gemv_words", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, state = model.forward([1, 2, 3])
        assert set(seen) == {(2, 2)}
        seen.clear()
        model.forward([4], state)
        assert set(seen) == {(1, 2)}
        assert torch.get_num_threads() == 2 and KERNELS.threads() == 2

        def broken(words):
            raise RuntimeError("boom")

        monkeypatch.setattr(KERNELS, "gemv_words", broken)
        with pytest.raises(RuntimeError, match="boom"):
            model.forward([4], state)
        assert torch.get_num_threads() == 2 and KERNELS.threads() == 2
    finally:
        torch.set_num_threads(previous)


@needs_kernels
def test_group_of_linears_is_one_call_with_the_same_results():
    g = gen(11)
    linears = [DenseLinear(torch.randn(64, 96, generator=g), torch.float32, "cpu"),
               QuantLinear(torch.randn(80, 96, generator=g), torch.float32, "cpu", bits=8),
               QuantLinear(torch.randn(96, 200, generator=g), torch.float32, "cpu", bits=4)]
    xs = [torch.randn(1, 96, generator=g), torch.randn(1, 96, generator=g), torch.relu(torch.randn(1, 200, generator=g))]
    grouped = run_group(list(zip(linears, xs)))
    for linear, x, y in zip(linears, xs, grouped):
        assert torch.allclose(y, linear(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# WKV recurrences: C kernels and the chunked form against the per-token loops


def random_wkv_inputs(T, H, N, seed, decay_low=0.3):
    g = gen(seed)
    r, k, v = (torch.randn(T, H, N, generator=g) for _ in range(3))
    decay = decay_low + (1 - decay_low) * torch.rand(T, H, N, generator=g)
    state = torch.randn(H, N, N, generator=g)
    return r, k, v, decay, state


@needs_kernels
@pytest.mark.parametrize("T,H,N", [(1, 3, 64), (17, 3, 64), (300, 2, 64), (9, 5, 32)])
def test_kernel_wkv5_and_wkv6_match_loop(T, H, N):
    r, k, v, decay, state = random_wkv_inputs(T, H, N, seed=T * H)
    bonus = torch.randn(H, N, 1, generator=gen(1)) * 0.5
    for w in (decay[0].unsqueeze(-1), decay.unsqueeze(-1)):  # v5.2 constant, v6 per token
        expected_out, expected_state = torch_ref.wkv5_loop(r, k, v, w, bonus, state)
        out, new_state = KERNELS.wkv5(r, k, v, w.squeeze(-1).contiguous(), bonus.squeeze(-1).contiguous(), state)
        assert rel(out, expected_out) <= 1e-5 and rel(new_state, expected_state) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("T,H,N", [(1, 3, 64), (17, 3, 64), (300, 2, 64), (9, 5, 32)])
def test_kernel_wkv7_matches_loop(T, H, N):
    r, k, v, decay, state = random_wkv_inputs(T, H, N, seed=7 + T, decay_low=0.545)
    g = gen(2)
    kk = torch.nn.functional.normalize(torch.randn(T, H, N, generator=g), dim=-1)
    a = torch.rand(T, H, N, generator=g)
    expected_out, expected_state = torch_ref.wkv7(r, decay, k, v, kk, a, state * 0.1)
    out, new_state = KERNELS.wkv7(r, decay, k, v, kk, a, state * 0.1)
    assert rel(out, expected_out) <= 1e-4 and rel(new_state, expected_state) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("T", [1, 5, 200])
def test_kernel_wkv4_matches_loop(T):
    g = gen(T)
    C = 200
    k, v = torch.randn(T, C, generator=g) * 3, torch.randn(T, C, generator=g)
    decay = -torch.exp(torch.randn(C, generator=g))
    first = torch.randn(C, generator=g)
    aa, bb, pp = torch.zeros(C), torch.zeros(C), torch.full((C,), -1e30)
    expected = torch_ref.wkv4(k, v, decay, first, aa, bb, pp)
    got = KERNELS.wkv4(k, v, decay, first, aa, bb, pp)
    for a, b in zip(got, expected):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("T,H,N,chunk", [(1, 3, 64, 32), (31, 3, 64, 8), (100, 3, 64, 32), (257, 1, 16, 32)])
@pytest.mark.parametrize("per_token", [False, True])
def test_chunked_wkv5_matches_loop(T, H, N, chunk, per_token):
    r, k, v, decay, state = random_wkv_inputs(T, H, N, seed=T + H, decay_low=0.0)
    decay[..., 0] = 1.0  # a channel that never forgets
    decay[..., 1] = 1e-30  # and one that forgets at once (log decay clamped, still exact)
    w = decay.unsqueeze(-1) if per_token else decay[0].unsqueeze(-1)
    bonus = torch.randn(H, N, 1, generator=gen(3)) * 0.5
    expected_out, expected_state = torch_ref.wkv5_loop(r, k, v, w, bonus, state)
    out, new_state = torch_ref.wkv5_chunked(r, k, v, w, bonus, state, chunk=chunk)
    assert rel(out, expected_out) <= 1e-4 and rel(new_state, expected_state) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Whole models: kernels on and off agree


@needs_kernels
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16i8"])
def test_model_with_and_without_kernels(version, strategy, engine_models, token_sequence, monkeypatch):
    path = engine_models[version, "three_heads"]
    fast = RWKV(path, strategy)
    seq_fast, state_fast = fast.forward(token_sequence, full_output=True)
    one_fast, _ = fast.forward([7], state_fast)
    monkeypatch.setenv("RWKV_CPU_KERNELS", "0")
    assert cpu_kernels.get() is None
    plain = RWKV(path, strategy)
    seq_plain, state_plain = plain.forward(token_sequence, full_output=True)
    one_plain, _ = plain.forward([7], state_plain)
    monkeypatch.delenv("RWKV_CPU_KERNELS")
    if strategy == "cpu fp32":
        assert rel(seq_fast, seq_plain) <= 1e-4 and rel(one_fast, one_plain) <= 1e-4
    else:  # int8 single tokens: int16 activations (kernel) vs bf16 ones (aten)
        cosine = torch.nn.functional.cosine_similarity(seq_fast, seq_plain, dim=-1).min()
        assert cosine >= 0.999
        assert torch.nn.functional.cosine_similarity(one_fast, one_plain, dim=0) >= 0.99


@needs_kernels
@pytest.mark.parametrize("strategy", ["cpu bf16", "cpu fp32i8"])
def test_prompt_work_on_torchs_threads_gives_the_same_logits(strategy, engine_models, token_sequence, monkeypatch):
    """While a prompt runs, the kernels' parallel loops use torch's own OpenMP threads (awake
    between torch's ops) instead of their pool; every work unit computes the same numbers."""
    if sys.platform.startswith("linux"):
        assert cpu_kernels._torch_gomp_parallel() is not None
    model = RWKV(engine_models["7", "three_heads"], strategy)
    on_team = model.forward(token_sequence, full_output=True)[0]
    monkeypatch.setattr(KERNELS.lib, "rk_set_team", lambda *args: None)  # stays off: the pool
    on_pool = model.forward(token_sequence, full_output=True)[0]
    assert torch.equal(on_team, on_pool)


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("RWKV_CPU_KERNELS", "0")
    assert cpu_kernels.get() is None
    weight = torch.randn(8, 16, generator=gen(4))
    linear = DenseLinear(weight, torch.float32, "cpu", layout="cols")
    assert linear.layout == "rows"  # the sparse layout exists only for the kernels
    for rows in (1, 3):
        x = torch.randn(rows, 16, generator=gen(rows))
        assert rel(linear(x), x.double() @ weight.double().t()) <= 1e-6


@needs_kernels
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("strategy,fused,bound", [
    ("cpu bf16", [True, True, True], 0.99),
    ("cpu bf16i8", [True, True, True], 0.98),
    ("cpu fp32 *1 -> cpu bf16", [True, True, True], 0.99),
    ("cpu bf16 *1+", [True, False, False], 0.99),  # streamed layers run op by op after a one-call layer
])
def test_one_call_layers_decode_close_to_fp32(version, strategy, fused, bound, engine_models, token_sequence):
    """Single tokens go through v6/v7 layers in one C call (fp32 activations, any weight format);
    decoded one at a time they stay close to the fp32 logits of the whole sequence."""
    path = engine_models[version, "three_heads"]
    reference, _ = RWKV(path, "cpu fp32").forward(token_sequence, full_output=True)
    model = RWKV(path, strategy)
    assert [w.fused is not None for w in model.layers] == fused
    state, rows = None, []
    for token in token_sequence:
        logits, state = model.forward([token], state)
        rows.append(logits)
    logits = torch.stack(rows)
    assert torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min() >= bound
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.85


@needs_kernels
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16i8", "cpu fp32 *1 -> cpu bf16"])
def test_all_layers_in_one_call_give_the_bits_of_a_call_per_layer(version, strategy, engine_models, token_sequence):
    """Where every layer is a one-call layer, a token (or a batch step) runs them all in one C call
    (rk_layers): the same layer functions in the same order, so the same bits as calling them one
    by one; layers of another kind keep the call per layer."""
    model = RWKV(engine_models[version, "three_heads"], strategy)
    assert model._one_call is not None and len(model._one_call) == model.n_layer
    _, state = model.forward(token_sequence[:5])
    states = [model.forward(token_sequence[:n])[1] for n in (3, 6)]
    one_call = (model.forward(token_sequence[5:6], state), model.forward_batch([7, 9], states))
    model._one_call = None
    per_layer = (model.forward(token_sequence[5:6], state), model.forward_batch([7, 9], states))
    for (got_logits, got_state), (want_logits, want_state) in zip(one_call, per_layer):
        assert torch.equal(got_logits, want_logits)
        got_states, want_states = (got_state, want_state) if isinstance(got_state, list) else ([got_state], [want_state])
        for got, want in zip(got_states, want_states):
            assert all(torch.equal(a, b) for la, lb in zip(got.layers, want.layers) for a, b in zip(la, lb))
    assert RWKV(engine_models[version, "three_heads"], "cpu bf16 *1+")._one_call is None  # a streamed layer
    assert RWKV(engine_models["5.2", "three_heads"], "cpu fp32")._one_call is None
