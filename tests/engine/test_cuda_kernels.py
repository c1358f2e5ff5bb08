"""The optional CUDA kernels (kernels/, rwkv_chat/engine/cuda.py).

Without a GPU (any machine):
* every .cu file compiles with plain `nvcc -c` for sm_90 and for nvcc's default (generic) target,
  with torch's half/bfloat16 flags, and the head-size kernels do not spill registers;
* the torch bindings (ops.cpp, ops_wkv.cpp) pass a syntax check against torch's headers;
* the kernel sources RUN on the CPU through a host emulation (tests/engine/cuda_emulation/) and
  match plain loops written here (`loop_wkv*`) for every dtype, batched and not, in place and not;
* the torch twins in cuda.py and the engine's `wkv` functions match those loops;
* RWKV_CUDA_ON=1 without CUDA, and a failing build, fall back to the torch path with at most
  one warning.

With a GPU (`-m gpu`; skipped with the reason shown otherwise, and a skip is not a pass): each
kernel against the loops for several head sizes and dtypes, the kernels inside a CUDA graph, and
a model on the GPU against the same model on the CPU.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rwkv_chat.engine import cpu_kernels, cuda
from rwkv_chat.engine.ops import torch_ref
from rwkv_chat.engine.ops.cpu import CpuOps
from rwkv_chat.engine.model import RWKV
from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

from .cuda_emulation.emulator import build_emulator, cuda_include_dir, emulation_unavailable

KERNELS = cuda.KERNEL_DIR
HEAD_SIZE_SOURCES = ("wkv5_6.cu", "wkv7.cu")
PLAIN_SOURCES = ("wkv4.cu", "int8_matmul.cu")
# what torch's cpp_extension passes to nvcc (the kernels must not rely on implicit half conversions)
TORCH_NVCC_FLAGS = [
    "-std=c++17", "-O3", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# output tolerance (relative to the output's scale): the kernels and the twins compute in float32
# from the same rounded inputs, so only the rounding of the output to the activation dtype differs
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STATE_TOL = 2e-5

NO_CUDA = not torch.cuda.is_available()


def gpu_test(test):
    """Marked `gpu`; skipped, with the reason shown, where torch sees no CUDA device."""
    reason = f"needs a CUDA device; torch {torch.__version__} sees none"
    return pytest.mark.gpu(pytest.mark.skipif(NO_CUDA, reason=reason)(test))


def _nvcc() -> str | None:
    return shutil.which("nvcc")


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed (CUDA toolkit needed to compile the .cu files)")


@pytest.fixture
def fresh_cuda(monkeypatch):
    """cuda.py as at start-up: nothing loaded, no failure recorded (restored afterwards)."""
    monkeypatch.setattr(cuda, "_libraries", {})
    monkeypatch.setattr(cuda, "_failure", None)
    monkeypatch.setattr(cuda, "_unsupported_warned", set())
    return cuda


# ---------------------------------------------------------------------------------------------
# Random inputs shared by the emulated and the GPU runs


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def wkv7_case(B, T, H, N, dtype, seed=0):
    g = _gen(seed)
    shape = (T, H, N) if B is None else (B, T, H, N)
    state_shape = (H, N, N) if B is None else (B, H, N, N)
    rand = lambda *s: torch.randn(*s, generator=g)
    r, k, v = rand(*shape), rand(*shape), rand(*shape)
    kk = F.normalize(rand(*shape), dim=-1)
    a = torch.sigmoid(rand(*shape))
    decay = torch.exp(-0.6065 * torch.sigmoid(2 * rand(*shape)))  # (0.545, 1), like the engine's
    state = 0.5 * rand(*state_shape)
    cast = lambda t: t.to(dtype)
    return dict(r=cast(r), decay=decay, k=cast(k), v=cast(v), kk=cast(kk), a=cast(a), state=state)


def wkv5_case(B, T, H, N, dtype, per_token, seed=0):
    g = _gen(seed)
    shape = (T, H, N) if B is None else (B, T, H, N)
    state_shape = (H, N, N) if B is None else (B, H, N, N)
    rand = lambda *s: torch.randn(*s, generator=g)
    r, k, v = rand(*shape), rand(*shape), rand(*shape)
    decay = torch.exp(-torch.exp(rand(*(shape if per_token else (H, N))) - 2))  # (0, 1), mostly slow
    if B is None:
        decay = decay.unsqueeze(-1)  # the engine's layouts: [H, K, 1] (v5.2), [T, H, K, 1] (v6)
    bonus = (0.4 + 0.4 * rand(H, N)).unsqueeze(-1)
    state = 0.5 * rand(*state_shape)
    cast = lambda t: t.to(dtype)
    return dict(r=cast(r), k=cast(k), v=cast(v), decay=decay, bonus=bonus, state=state)


def wkv4_case(B, T, C, dtype, seed=0):
    g = _gen(seed)
    shape = (T, C) if B is None else (B, T, C)
    state_shape = (C,) if B is None else (B, C)
    rand = lambda *s: torch.randn(*s, generator=g)
    k, v = rand(*shape), rand(*shape)
    decay = -torch.exp(torch.rand(C, generator=g) * 8 - 6)
    first = 0.5 * rand(C) - 0.5
    aa, bb = rand(*state_shape), torch.rand(*state_shape, generator=g) + 0.5
    pp = rand(*state_shape)
    pp.view(-1)[::3] = -1e30  # fresh channels, as in a zero state
    return dict(k=k.to(dtype), v=v.to(dtype), decay=decay, first=first, aa=aa, bb=bb, pp=pp)


def int8_case(M, K, N, dtype, seed=0):
    g = _gen(seed)
    weight = torch.randn(N, K, generator=g) / K**0.5
    groups = weight.view(N, K // 32, 32)  # QuantLinear's int8 format: one scale per 32 inputs
    scale = groups.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
    x = torch.randn(M, K, generator=g).to(dtype)
    return x, q, scale


# ---------------------------------------------------------------------------------------------
# The recurrences as plain loops (float64; a leading batch dimension is looped over)


def _per_batch(loop, case: dict, shared: tuple[str, ...]):
    """Run `loop` once per batch row of `case` (names in `shared` have no batch dimension)."""
    first = next(t for n, t in case.items() if n not in shared)
    rows = [loop(**{n: (t if n in shared else t[b]) for n, t in case.items()}) for b in range(first.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*rows))


def loop_wkv7(r, decay, k, v, kk, a, state):
    """S[h] (V x K) <- S diag(w) - (S kk)(kk a)^T + v k^T ;  out = S r."""
    if r.dim() == 4:
        return _per_batch(loop_wkv7, dict(r=r, decay=decay, k=k, v=v, kk=kk, a=a, state=state), ())
    r, w, k, v, kk, a = (t.double().reshape(r.shape) for t in (r, decay, k, v, kk, a))
    S = state.double().clone()
    out = torch.empty_like(r)
    for t in range(r.shape[0]):
        for h in range(r.shape[1]):
            removed = S[h] @ kk[t, h]  # [V]
            S[h] = S[h] * w[t, h][None, :] - torch.outer(removed, kk[t, h] * a[t, h]) + torch.outer(v[t, h], k[t, h])
            out[t, h] = S[h] @ r[t, h]
    return out, S


def loop_wkv5(r, k, v, decay, bonus, state):
    """S[h] (K x V): out = r^T (u k v^T + S);  S <- k v^T + w S (w per channel k, or per token too)."""
    T, H, N = r.shape[-3:]
    per_token = decay.numel() not in (H * N,)
    if r.dim() == 4:
        shared = ("bonus",) + (() if per_token else ("decay",))
        return _per_batch(loop_wkv5, dict(r=r, k=k, v=v, decay=decay, bonus=bonus, state=state), shared)
    r, k, v = (t.double() for t in (r, k, v))
    w = decay.double().reshape((T, H, N) if per_token else (1, H, N)).expand(T, H, N)
    u = bonus.double().reshape(H, N)
    S = state.double().clone()
    out = torch.empty_like(r)
    for t in range(T):
        for h in range(H):
            kv = torch.outer(k[t, h], v[t, h])
            out[t, h] = r[t, h] @ (u[h][:, None] * kv + S[h])
            S[h] = kv + w[t, h][:, None] * S[h]
    return out, S


def loop_wkv4(k, v, decay, first, aa, bb, pp):
    """RWKV-4 with the running maximum p: out = (a + e^(u+k) v) / (b + e^(u+k)), then the sums
    decay by e^w and take in the token."""
    if k.dim() == 3:
        return _per_batch(loop_wkv4, dict(k=k, v=v, decay=decay, first=first, aa=aa, bb=bb, pp=pp), ("decay", "first"))
    k, v, w, u = (t.double() for t in (k, v, decay, first))
    a, b, p = aa.double().clone(), bb.double().clone(), pp.double().clone()
    out = torch.empty_like(k)
    for t in range(k.shape[0]):
        for c in range(k.shape[1]):
            q = max(p[c], u[c] + k[t, c])
            e1, e2 = torch.exp(p[c] - q), torch.exp(u[c] + k[t, c] - q)
            out[t, c] = (e1 * a[c] + e2 * v[t, c]) / (e1 * b[c] + e2)
            q = max(p[c] + w[c], k[t, c])
            e1, e2 = torch.exp(p[c] + w[c] - q), torch.exp(k[t, c] - q)
            a[c], b[c], p[c] = e1 * a[c] + e2 * v[t, c], e1 * b[c] + e2, q
    return out, a, b, p


def to(case: dict, device) -> dict:
    return {name: t.to(device) for name, t in case.items()}


def assert_close_scaled(got, want, tol, what):
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs().max().clamp_min(1e-6)
    err = (got - want).abs().max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def check_wkv7(impl, B, H, N, dtype, device="cpu", T=9, inplace=False):
    case = wkv7_case(B, T, H, N, dtype)
    want_out, want_state = loop_wkv7(**case)
    args = to(case, device)
    before = args["state"].clone()
    got_out, got_state = impl(**args, inplace=True) if inplace else impl(**args)
    assert got_out.dtype == dtype and got_out.shape == case["r"].shape
    assert_close_scaled(got_out, want_out.to(dtype), OUT_TOL[dtype], "wkv7 out")
    assert_close_scaled(got_state, want_state, STATE_TOL, "wkv7 state")
    if inplace:
        assert got_state.data_ptr() == args["state"].data_ptr()
    else:
        assert torch.equal(args["state"], before), "wkv7 modified the state it was given"


def check_wkv5(impl, B, H, N, dtype, per_token, device="cpu", T=9, inplace=False):
    case = wkv5_case(B, T, H, N, dtype, per_token)
    want_out, want_state = loop_wkv5(**case)
    args = to(case, device)
    before = args["state"].clone()
    got_out, got_state = impl(**args, inplace=True) if inplace else impl(**args)
    assert got_out.dtype == dtype and got_out.shape == case["r"].shape
    assert_close_scaled(got_out, want_out.to(dtype), OUT_TOL[dtype], "wkv5 out")
    assert_close_scaled(got_state, want_state, STATE_TOL, "wkv5 state")
    if not inplace:
        assert torch.equal(args["state"], before), "wkv5 modified the state it was given"


def check_wkv4(impl, B, C, dtype, device="cpu", T=11):
    case = wkv4_case(B, T, C, dtype)
    want = loop_wkv4(**case)
    args = to(case, device)
    before = [args[n].clone() for n in ("aa", "bb", "pp")]
    got = impl(**args)
    assert got[0].dtype == dtype and got[0].shape == case["k"].shape
    assert_close_scaled(got[0], want[0].to(dtype), OUT_TOL[dtype], "wkv4 out")
    for name, g_, w_ in zip(("aa", "bb", "pp"), got[1:], want[1:]):
        assert_close_scaled(g_, w_, STATE_TOL, f"wkv4 {name}")
    for name, old in zip(("aa", "bb", "pp"), before):
        assert torch.equal(args[name], old), f"wkv4 modified {name}"


def check_int8(impl, M, K, N, dtype, device="cpu"):
    x, q, scale = int8_case(M, K, N, dtype)
    want = cuda.torch_int8_matmul(x, q, scale)
    got = impl(x.to(device), q.to(device), scale.to(device))
    assert got.dtype == dtype and got.shape == (M, N)
    assert_close_scaled(got, want, OUT_TOL[dtype] + 1e-5, "int8 matmul")


# ---------------------------------------------------------------------------------------------
# Compiling (no GPU needed)


def _compile(tmp_path, source, arch=None, head_size=None, verbose=False):
    command = [_nvcc(), "-c", str(KERNELS / source), "-o", str(tmp_path / (source + ".o")), *TORCH_NVCC_FLAGS]
    if arch:
        command.append(f"-arch={arch}")
    if head_size is not None:
        command.append(f"-DRWKV_HEAD_SIZE={head_size}")
    if verbose:
        command += ["-Xptxas", "-v"]
    return subprocess.run(command, capture_output=True, text=True)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", None], ids=["sm_90", "generic"])
@pytest.mark.parametrize("source", PLAIN_SOURCES + HEAD_SIZE_SOURCES)
def test_cu_file_compiles_with_plain_nvcc(tmp_path, source, arch):
    head_size = 64 if source in HEAD_SIZE_SOURCES else None
    result = _compile(tmp_path, source, arch, head_size)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("head_size", [32, 128])
@pytest.mark.parametrize("source", HEAD_SIZE_SOURCES)
def test_wkv_files_compile_for_other_head_sizes(tmp_path, source, head_size):
    result = _compile(tmp_path, source, "sm_90", head_size)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_nvcc
@pytest.mark.parametrize("source", HEAD_SIZE_SOURCES)
def test_wkv_kernels_keep_the_state_in_registers_at_head_size_64(tmp_path, source):
    result = _compile(tmp_path, source, "sm_90", 64, verbose=True)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stdout + result.stderr)]
    assert spills and not any(spills), f"register spills: {spills}"


@needs_nvcc
def test_missing_head_size_is_a_clear_compile_error(tmp_path):
    result = _compile(tmp_path, "wkv7.cu", "sm_90")
    assert result.returncode != 0
    assert "-DRWKV_HEAD_SIZE" in result.stderr


def _torch_cuda_headers_missing() -> str | None:
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include_dir() is None:
        return "no CUDA headers found (cuda_runtime_api.h)"
    from torch.utils.cpp_extension import include_paths

    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in include_paths()):
        return "this torch install has no c10/cuda headers"
    return None


@pytest.mark.skipif(_torch_cuda_headers_missing() is not None, reason=str(_torch_cuda_headers_missing()))
@pytest.mark.parametrize("source", ["ops.cpp", "ops_wkv.cpp"])
def test_torch_bindings_pass_a_syntax_check(tmp_path, source):
    from torch.utils.cpp_extension import include_paths

    # CPU wheels of torch lack one generated header of the CUDA build; a stub stands in for it.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-DRWKV_HEAD_SIZE=64", f"-I{KERNELS}",
               *[f"-I{p}" for p in include_paths()], f"-I{tmp_path / 'stub'}", f"-I{cuda_include_dir()}",
               str(KERNELS / source)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    ours = [line for line in result.stderr.splitlines() if str(KERNELS) in line and "warning" in line]
    assert not ours, "\n".join(ours)


# ---------------------------------------------------------------------------------------------
# The kernel sources run on the CPU (host emulation)

_EMULATION_SKIP = emulation_unavailable()
needs_emulation = pytest.mark.skipif(_EMULATION_SKIP is not None, reason=f"kernel emulation: {_EMULATION_SKIP}")


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda-emulation")
    return {n: build_emulator(n, folder) for n in (16, 64)}


@needs_emulation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_size", [16, 64])
def test_emulated_wkv7_matches_twin(emulators, dtype, head_size):
    emu = emulators[head_size]
    check_wkv7(emu.wkv7, None, 2, head_size, dtype)
    check_wkv7(emu.wkv7, 2, 3, head_size, dtype, T=5)
    check_wkv7(emu.wkv7, None, 2, head_size, dtype, T=4, inplace=True)


@needs_emulation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["v5.2", "v6"])
def test_emulated_wkv5_matches_twin(emulators, dtype, per_token):
    check_wkv5(emulators[16].wkv5, None, 3, 16, dtype, per_token)
    check_wkv5(emulators[64].wkv5, 2, 2, 64, dtype, per_token, T=5)
    check_wkv5(emulators[16].wkv5, None, 2, 16, dtype, per_token, T=3, inplace=True)


@needs_emulation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_wkv4_matches_twin(emulators, dtype):
    check_wkv4(emulators[16].wkv4, None, 200, dtype)  # C not a multiple of the block size
    check_wkv4(emulators[16].wkv4, 2, 64, dtype, T=4)


@needs_emulation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 6])
def test_emulated_int8_gemv_matches_twin(emulators, dtype, M):
    emu = emulators[16]
    check_int8(emu.int8_matmul, M, 96, 37, dtype)  # fewer 16-byte pieces per row than lanes
    check_int8(emu.int8_matmul, M, 1056, 11, dtype)  # more pieces than lanes, ragged last round


@needs_emulation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_int8_dequantize(emulators, dtype):
    _, q, scale = int8_case(1, 96, 37, torch.float32)
    got = emulators[16].int8_dequantize(q, scale, dtype)
    assert torch.equal(got, (q.float().view(37, 3, 32) * scale[..., None]).view(37, 96).to(dtype))


# ---------------------------------------------------------------------------------------------
# The engine's recurrences and the torch twins in cuda.py against the loops above


def _assert_matches(got, want, what):
    for name, g_, w_ in zip(("out", "state", "state", "state"), got, want):
        torch.testing.assert_close(g_.double(), w_, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def _backend(impl: str, version: str):
    """One implementation of a version's WKV: the torch reference backend, the C kernels' backend,
    or cuda.py's twin (used when a kernel build fails)."""
    if impl == "cpu kernels":
        kernels = cpu_kernels.get()
        if kernels is None:
            pytest.skip("the CPU kernels are not available here")
        return getattr(CpuOps(kernels), f"wkv{version}")
    return getattr(torch_ref, f"wkv{version}") if impl == "torch" else getattr(cuda, f"torch_wkv{version}")


IMPLS = ["torch", "cpu kernels", "cuda twin"]


@pytest.mark.parametrize("impl", IMPLS)
def test_wkv7_is_the_recurrence(impl):
    case = wkv7_case(None, 7, 3, 16, torch.float32)
    _assert_matches(_backend(impl, "7")(**case), loop_wkv7(**case), f"v7 {impl}")


@pytest.mark.parametrize("impl", IMPLS + ["torch loop"])
@pytest.mark.parametrize("per_token", [False, True], ids=["v5.2", "v6"])
def test_wkv5_is_the_recurrence(impl, per_token):
    case = wkv5_case(None, 7, 3, 16, torch.float32, per_token)
    fn = torch_ref.wkv5_loop if impl == "torch loop" else _backend(impl, "5")
    _assert_matches(fn(**case), loop_wkv5(**case), f"v5 {impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_wkv4_is_the_recurrence(impl):
    case = wkv4_case(None, 6, 32, torch.float32)
    _assert_matches(_backend(impl, "4")(**case), loop_wkv4(**case), f"v4 {impl}")


def test_wkv4_loop_matches_the_unshifted_formula():
    """The max-shifted sums equal the plain definition for small exponents."""
    case = wkv4_case(None, 5, 8, torch.float32)
    case["pp"] = torch.full((8,), -1e30)
    case["aa"], case["bb"] = torch.zeros(8), torch.zeros(8)
    k, v, w, u = case["k"].double(), case["v"].double(), case["decay"].double(), case["first"].double()
    out, *_ = loop_wkv4(**case)
    for t in range(5):
        weights = [torch.exp((t - 1 - i) * w + k[i]) for i in range(t)] + [torch.exp(u + k[t])]
        values = [v[i] for i in range(t + 1)]
        want = sum(wt * vi for wt, vi in zip(weights, values)) / sum(weights)
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Switching on and falling back (no GPU needed)


def test_without_cuda_the_kernels_stay_off_even_when_asked(fresh_cuda, monkeypatch):
    if not NO_CUDA:
        pytest.skip("this checks a machine without CUDA")
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    t = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        assert not cuda.enabled()
        assert not cuda.available_for(t)
        assert cuda.load(64) is False
        case = wkv7_case(None, 3, 2, 8, torch.float32)
        out, state = cuda.wkv7(**case)  # CPU tensors: the twin runs
    want = cuda.torch_wkv7(**case)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(state, want[1])
    assert "sees no CUDA device" in cuda.status()


def test_status_when_switched_off(monkeypatch):
    monkeypatch.delenv("RWKV_CUDA_ON", raising=False)
    assert cuda.status() == "CUDA kernels: off (set RWKV_CUDA_ON=1 to use them)"
    assert not cuda.available_for(SimpleNamespace(is_cuda=True))


BUILD_LOG = """Error building extension 'rwkv_chat_wkv_hs64': [1/3] /usr/local/cuda/bin/nvcc -c wkv7.cu -o wkv7.cuda.o
FAILED: wkv7.cuda.o
/src/rwkv_chat/kernels/wkv7.cu(42): error: identifier "foo" is undefined
1 error detected in the compilation of "wkv7.cu".
"""


def test_a_failed_build_warns_once_and_falls_back(fresh_cuda, monkeypatch):
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    builds = []

    def failing_build(name, head_size):
        builds.append(name)
        raise RuntimeError(BUILD_LOG)

    monkeypatch.setattr(cuda, "_build", failing_build)
    monkeypatch.setattr(cuda, "_is_cuda", lambda t: True)  # CPU tensors take the kernel path
    case = wkv7_case(None, 4, 2, 8, torch.float32)
    assert cuda.available_for(case["r"])

    with pytest.warns(RuntimeWarning) as caught:
        out, state = cuda.wkv7(**case)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert 'wkv7.cu(42): error: identifier "foo" is undefined' in message
    assert "torch path" in message
    want = cuda.torch_wkv7(**case)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(state, want[1])
    assert not cuda.available_for(case["r"])
    assert "build failed" in cuda.status() or NO_CUDA

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls: no warning, no new build attempt
        out5, _ = cuda.wkv5(**wkv5_case(None, 3, 2, 8, torch.float32, False))
        y = cuda.int8_matmul(*int8_case(2, 32, 5, torch.float32))
        out4, *_ = cuda.wkv4(**wkv4_case(None, 3, 8, torch.float32))
        assert cuda.load(8) is False or NO_CUDA
    assert builds == ["rwkv_chat_wkv_hs8"]
    assert y.shape == (2, 5) and out5.shape == (3, 2, 8) and out4.shape == (3, 8)


def _refuse_to_build(name, head_size):
    raise OSError("CUDA_HOME environment variable is not set")


def _must_not_build(name, head_size):
    pytest.fail(f"{name} must not be built")


def test_an_unsupported_head_size_uses_the_twin(fresh_cuda, monkeypatch):
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    monkeypatch.setattr(cuda, "_is_cuda", lambda t: True)
    monkeypatch.setattr(cuda, "_build", _must_not_build)
    case = wkv7_case(None, 2, 2, 6, torch.float32)
    with pytest.warns(RuntimeWarning, match="head sizes"):
        out, _ = cuda.wkv7(**case)
    torch.testing.assert_close(out, cuda.torch_wkv7(**case)[0])
    assert cuda.available_for(case["r"])  # other head sizes still go to the kernels


def test_int8_with_unaligned_width_uses_the_twin(fresh_cuda, monkeypatch):
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    monkeypatch.setattr(cuda, "_is_cuda", lambda t: True)
    monkeypatch.setattr(cuda, "_build", _must_not_build)
    x, q, scale = int8_case(3, 64, 7, torch.float32)
    x, q = x[:, :48], q[:, :48]  # 48 % 32 != 0: a short last group
    torch.testing.assert_close(cuda.int8_matmul(x, q, scale), cuda.torch_int8_matmul(x, q, scale))


@pytest.mark.parametrize("log, line", [
    (BUILD_LOG, '/src/rwkv_chat/kernels/wkv7.cu(42): error: identifier "foo" is undefined'),
    ("OSError: CUDA_HOME environment variable is not set.", "OSError: CUDA_HOME environment variable is not set."),
    ("RuntimeError: Ninja is required to load C++ extensions", "RuntimeError: Ninja is required to load C++ extensions"),
    ("x.cpp:3:10: fatal error: torch/library.h: No such file", "x.cpp:3:10: fatal error: torch/library.h: No such file"),
])
def test_first_error_line(log, line):
    assert cuda.first_error_line(log) == line


# ---------------------------------------------------------------------------------------------
# On a GPU


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    assert cuda.load(), f"the common kernels did not build: {cuda.status()}"
    return cuda


def _ran(name):
    return cuda.calls[name]


@gpu_test
@pytest.mark.parametrize("head_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_wkv7_matches_twin(kernels_on, head_size, dtype):
    before = _ran("wkv7")
    check_wkv7(cuda.wkv7, None, 3, head_size, dtype, device="cuda", T=37)
    check_wkv7(cuda.wkv7, None, 2, head_size, dtype, device="cuda", T=1)  # decode
    assert _ran("wkv7") == before + 2, "the kernel did not run (fallback?)"


@gpu_test
@pytest.mark.parametrize("head_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["v5.2", "v6"])
def test_gpu_wkv5_matches_twin(kernels_on, head_size, dtype, per_token):
    name = "wkv6" if per_token else "wkv5"
    before = _ran(name)
    check_wkv5(cuda.wkv5, None, 3, head_size, dtype, per_token, device="cuda", T=37)
    check_wkv5(cuda.wkv5, None, 2, head_size, dtype, per_token, device="cuda", T=1)
    assert _ran(name) == before + 2


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_wkv4_matches_twin(kernels_on, dtype):
    before = _ran("wkv4")
    check_wkv4(cuda.wkv4, None, 2048 + 7, dtype, device="cuda", T=37)
    check_wkv4(cuda.wkv4, None, 256, dtype, device="cuda", T=1)
    assert _ran("wkv4") == before + 2


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, N", [(1, 2048, 2048), (1, 8192, 2048), (3, 2048, 37), (16, 64, 1000),
                                     (17, 2048, 2048), (300, 1024, 4096)])
def test_gpu_int8_matmul_matches_twin(kernels_on, dtype, M, K, N):
    gemv, dequant = _ran("int8_gemv"), _ran("int8_dequant_matmul")
    tol = OUT_TOL[dtype] if M <= 16 else {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    x, q, scale = int8_case(M, K, N, dtype)
    got = cuda.int8_matmul(x.cuda(), q.cuda(), scale.cuda())
    assert got.dtype == dtype and got.shape == (M, N)
    assert_close_scaled(got, cuda.torch_int8_matmul(x, q, scale), tol, "int8 matmul")
    assert (_ran("int8_gemv") > gemv) if M <= 16 else (_ran("int8_dequant_matmul") > dequant)


@gpu_test
def test_gpu_int8_matmul_takes_int8linear_weights(kernels_on):
    from rwkv_chat.engine.quant import QuantLinear

    weight = torch.randn(512, 256)
    linear = QuantLinear(weight, torch.float16, "cuda", bits=8)
    x = torch.randn(2, 5, 256, dtype=torch.float16, device="cuda")
    got = cuda.int8_matmul(x, linear.q, linear.scale.float())
    assert got.shape == (2, 5, 512)
    assert_close_scaled(got, linear(x), 2e-2, "int8 vs QuantLinear")


@gpu_test
def test_gpu_kernels_run_inside_a_cuda_graph(kernels_on):
    case = to(wkv7_case(None, 1, 4, 64, torch.float16), "cuda")
    state = case.pop("state")
    want_out, want_state = cuda.wkv7(**case, state=state)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda.wkv7(**case, state=state)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_state = cuda.wkv7(**case, state=state)
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(new_state, want_state)


@gpu_test
def test_gpu_build_failure_falls_back(fresh_cuda, monkeypatch):
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    monkeypatch.setattr(cuda, "_build", _refuse_to_build)
    case = to(wkv7_case(None, 4, 2, 64, torch.float16), "cuda")
    with pytest.warns(RuntimeWarning, match="CUDA_HOME"):
        out, _ = cuda.wkv7(**case)
    assert out.is_cuda
    assert not cuda.available_for(case["r"])
    assert "build failed" in cuda.status()


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-models")
    return {v: save_checkpoint(folder / f"v{v}.pth", make_checkpoint(v, 3, 256, vocab_size=2000, seed=9))
            for v in ("4", "5.2", "6", "7")}


@gpu_test
@pytest.mark.parametrize("strategy, tol", [("cuda fp32", 1e-4), ("cuda fp16", 2e-2)])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_gpu_model_with_kernels_matches_the_cpu(gpu_models, monkeypatch, version, strategy, tol):
    monkeypatch.setenv("RWKV_CUDA_ON", "1")
    want, want_state = RWKV(gpu_models[version], strategy="cpu fp32").forward([5, 6, 7, 11, 1999], None)
    got, state = RWKV(gpu_models[version], strategy=strategy).forward([5, 6, 7, 11, 1999], None)
    assert_close_scaled(got, want, tol, f"v{version} {strategy} prefill")
    want, _ = RWKV(gpu_models[version], strategy="cpu fp32").forward([3], want_state)
    got, _ = RWKV(gpu_models[version], strategy=strategy).forward([3], state)
    assert_close_scaled(got, want, tol, f"v{version} {strategy} decode")
