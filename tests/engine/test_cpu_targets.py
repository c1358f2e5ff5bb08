"""The CPU kernels as other machines build them: compiled here for `-march=x86-64-v3` (AVX2 + FMA,
no AVX-512: most laptops), they must take the 8-lane tiles and give the products, the batches and
the models that the 16-lane build gives."""
import platform
import shutil

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.engine import cpu_kernels
from rwkv_chat.engine.quant import KERNEL_ROWS, DenseLinear, QuantLinear

from .conftest import VERSIONS
from .test_cpu_fast_paths import gen, plain_dequantize, rel


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


runs_avx2 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= _cpu_flags()
    or shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="needs an x86-64 CPU with AVX2 (to run what is built for one) and a C compiler")


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory):
    return cpu_kernels.for_target("-march=x86-64-v3", tmp_path_factory.mktemp("avx2-kernels"))


@pytest.fixture
def avx2(avx2_build, monkeypatch):
    """The AVX2 build in place of this machine's for whatever is made inside the test."""
    monkeypatch.setattr(cpu_kernels, "_loaded", avx2_build)
    return avx2_build


@runs_avx2
def test_the_avx2_build_has_8_lane_tiles_and_no_bf16_products(avx2):
    assert cpu_kernels.get() is avx2
    assert avx2.simd == 1 and not avx2.native_bf16_gemm


def make_linear(kind, weight):
    """(linear, the dtype of its input, its weight as the products see it, in float64)"""
    if kind in ("fp32 rows", "fp32 cols", "bf16 rows", "bf16 cols"):
        dtype = torch.float32 if kind.startswith("fp32") else torch.bfloat16
        linear = DenseLinear(weight, dtype, "cpu", layout=kind.split()[1])
        return linear, dtype, weight.to(dtype).double()
    if kind == "bf16 weights":  # fp32 activations (placement.cpu_activations): widened in the tiles
        linear = DenseLinear(weight, torch.float32, "cpu", weights=torch.bfloat16)
        return linear, torch.float32, weight.bfloat16().double()
    linear = QuantLinear(weight, torch.float32, "cpu", bits=kind)
    return linear, torch.float32, plain_dequantize(linear)


def rounded_input(kind, x: torch.Tensor) -> torch.Tensor:
    """x as the products see it (float64): int8 rows round each vector to int16 on its largest
    magnitude, int4 rows round each group of 32 inputs to int8 on the group's (rwkv_cpu.h);
    floats are taken as they are."""
    if kind not in (8, 4):
        return x.double()
    x = x.float()
    if kind == 8:
        top = x.abs().amax(dim=-1, keepdim=True)
        step = torch.where(top > 0, top / 32767, torch.ones_like(top))
        return (torch.round(x * (1 / step)).clamp(-32767, 32767) * step).double()
    n = x.shape[-1]
    groups = torch.nn.functional.pad(x, (0, -n % 32)).reshape(x.shape[0], -1, 32)
    top = groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(top > 0, 127 / top, torch.zeros_like(top))
    return (torch.round(groups * inverse) * (top / 127)).reshape(x.shape[0], -1)[:, :n].double()


KINDS = ["fp32 rows", "fp32 cols", "bf16 rows", "bf16 cols", "bf16 weights", 8, 4]


@runs_avx2
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_features,in_features", [(768, 768), (101, 37), (7, 64), (513, 8200), (300, 800)])
def test_avx2_products_match_float64(avx2, kind, out_features, in_features):
    g = gen(7 * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    linear, dtype, effective = make_linear(kind, weight)
    assert linear._job is not None  # the kernels run it
    x = torch.randn(KERNEL_ROWS, in_features, generator=g)
    x[torch.rand(x.shape, generator=g) < 0.3] = 0
    x[:, 3 % in_features] = 40.0  # an outlier: int8 rows must keep the small values (int16 activations)
    x = x.to(dtype)
    together = linear(x)
    expected = rounded_input(kind, x) @ effective.t()  # exact products: what is left is float32 summing
    for b in range(KERNEL_ROWS):
        assert rel(together[b], expected[b]) <= (1e-2 if kind in ("bf16 rows", "bf16 cols") else 1e-5), b
    for rows in (1, 3):  # every row of a batch is bitwise the row computed alone
        for b in range(rows):
            assert torch.equal(linear(x[b:b + 1])[0], together[b])


@runs_avx2
@pytest.mark.parametrize("bits", [8, 4, "8a8"])
def test_avx2_integer_kernels_are_exact_on_integer_inputs(avx2, bits):
    """Inputs the rounding keeps exactly (see the 16-lane twin in test_cpu_fast_paths): the group
    sums are exact integers on the 8-lane tiles too, blocks and the inputs past them alike."""
    act8 = bits == "8a8"
    g = gen(200 if act8 else bits + 100)
    weight = torch.randn(64, 677, generator=g)  # a last group of 5 inputs (i8a8's zero-padded chunk)
    top = 32767 if bits == 8 else 127
    x = torch.randint(-top, top + 1, (2, 677), generator=g).float()
    x[:, ::32] = float(top)
    linear = QuantLinear(weight, torch.float32, "cpu", bits=8 if act8 else bits, act8=act8)
    assert rel(linear(x), x.double() @ plain_dequantize(linear).t()) <= 1e-6


@runs_avx2
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16i8", "cpu bf16i8a8", "cpu bf16i4"])
def test_avx2_models_match_the_avx512_build(version, strategy, engine_models, token_sequence, avx2_build,
                                            monkeypatch):
    """A whole model, prompt and single tokens, on the AVX2 build against this machine's build:
    the same arithmetic on other instructions (float sums in another order)."""
    path = engine_models[version, "three_heads"]
    native = RWKV(path, strategy)
    expected, state = native.forward(token_sequence, full_output=True)
    expected_one, _ = native.forward([7], state)
    monkeypatch.setattr(cpu_kernels, "_loaded", avx2_build)
    model = RWKV(path, strategy)
    got, state = model.forward(token_sequence, full_output=True)
    got_one, _ = model.forward([7], state)
    # bf16i8 / bf16i4 prompts: bf16 products here (AVX-512 BF16), fp32 ones on the AVX2 build
    bound = 1 - 1e-9 if strategy == "cpu fp32" else 0.999
    assert torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=-1).min() >= bound
    assert torch.nn.functional.cosine_similarity(got_one.double(), expected_one.double(), dim=0) >= bound


@runs_avx2
@pytest.mark.parametrize("version", VERSIONS)
def test_avx2_cpu_bf16_computes_in_fp32_and_decodes_a_bf16_checkpoint_as_fp32(avx2, version, make_model_file,
                                                                             token_sequence):
    """Without AVX-512 BF16, `cpu bf16` still keeps fp32 activations (the 8-lane tiles widen the
    weights; prompts take torch's fp32 GEMM on widened blocks rather than its slow bf16 one), so
    on a bf16 checkpoint it gives `cpu fp32`'s logits: bit for bit for single tokens and short
    pieces, to float rounding for a prompt."""
    path = make_model_file(version, n_layer=3, n_embd=192, seed=7, dtype=torch.bfloat16)
    fp32, bf16 = RWKV(path, "cpu fp32"), RWKV(path, "cpu bf16")
    assert all(p.dtype == torch.float32 and p.weight_dtype == torch.bfloat16 for p in bf16.plan)
    state32 = state16 = None
    for piece in ([token_sequence[0]], token_sequence[1:12], [token_sequence[12]]):
        logits32, state32 = fp32.forward(piece, state32)
        logits16, state16 = bf16.forward(piece, state16)
        assert torch.equal(logits16, logits32)
    prompt32, _ = fp32.forward(token_sequence * 3, None, full_output=True)
    prompt16, _ = bf16.forward(token_sequence * 3, None, full_output=True)
    assert len(token_sequence) * 3 > KERNEL_ROWS  # the GEMM path
    assert rel(prompt16, prompt32) <= 1e-4


runs_x86_64 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="needs an x86-64 CPU and a C compiler")


@runs_x86_64
@pytest.mark.parametrize("bits", [4, "8a8"])
def test_portable_loops_round_int8_inputs_per_group(bits, tmp_path, monkeypatch):
    """The build without SIMD (`-march=x86-64`: the portable loops) rounds int4's and i8a8's inputs
    per group of 32 like the tiles: the float64 product of the two roundings, a last short group
    and the blocks alike."""
    from .test_cpu_fast_paths import rounded_per_group

    portable = cpu_kernels.for_target("-march=x86-64", tmp_path)
    assert portable.simd == 0
    monkeypatch.setattr(cpu_kernels, "_loaded", portable)
    g = gen(300)
    weight = torch.randn(50, 677, generator=g) / 20
    x = torch.randn(3, 677, generator=g)
    linear = QuantLinear(weight, torch.float32, "cpu", bits=8 if bits == "8a8" else 4, act8=bits == "8a8")
    assert linear._job is not None
    assert rel(linear(x), rounded_per_group(x) @ plain_dequantize(linear).t()) <= 1e-6
