"""Optional CUDA kernels for the WKV recurrences and int8 matmuls; plain-torch twins otherwise.

Sources: `kernels/` at the repository root (shipped inside the package as `rwkv_chat/kernels`). With `RWKV_CUDA_ON=1` and a CUDA device, the first call that needs
a kernel builds it with torch's cpp_extension (a minute or so; needs nvcc and ninja) and loads it.
Builds are cached between runs in private folders `cuda-<name>` inside the kernel cache
(`RWKV_CHAT_KERNEL_DIR`, default `<user cache dir>/rwkv-chat/kernels`), which follow the rules of
kernel_cache.py: created 0700, refused when a symlink, owned by someone else or writable by
others. One build for v4 + int8 (`rwkv_chat_ops`) and one per head size for v5.2/v6/v7
(`rwkv_chat_wkv_hs<N>`, compiled with `-DRWKV_HEAD_SIZE=N`).
`RWKV_CUDA_VERBOSE=1` shows the build log.

If a build fails, ONE RuntimeWarning names the compiler's first error line, `available_for`
answers False from then on, and the call that hit the failure returns the torch twin's result:
nothing crashes.

The engine reaches these through ops/cuda.py, the backend a layer on a CUDA device gets at load
with RWKV_CUDA_ON=1 (same functions and layouts as ops/torch_ref.py).

Layouts (T tokens, H heads of N channels, C = H * N). The state passed in is never modified.
Outputs have the dtype of `r` (v4: of `k`); token tensors may be float32, float16 or bfloat16 and
are all converted to r's dtype; decays, bonuses and states are read as float32.

    wkv4(k, v, decay, first, aa, bb, pp)    -> (out, aa, bb, pp)
        k, v, out [T, C]; decay [C] = -exp(time_decay) (log of the per-step factor);
        first [C] = time_first (u); aa, bb, pp [C] float32 (pp starts at -1e30).
    wkv5(r, k, v, decay, bonus, state)      -> (out, state)            v5.2 and v6
        r, k, v, out [T, H, N]; decay: the factor w in (0, 1), [H, N] or [H, N, 1] (v5.2) or
        [T, H, N] or [T, H, N, 1] (v6, one per token); bonus (u = time_faaaa) [H, N] or [H, N, 1];
        state [H, K, V] float32:  out_t = r_t (u k_t v_t^T + S);  S <- k_t v_t^T + w S.
    wkv7(r, decay, k, v, kk, a, state)      -> (out, state)
        r, k, v, kk, a, out [T, H, N]; decay: the factor w in (0, 1), [T, H, N];
        kk: unit-length removal key; a: in-context learning rate; state [H, V, K] float32:
        S <- S diag(w) + (S (-kk)) (kk a)^T + v k^T;  out = S r.
    int8_matmul(x, q, scale)                -> x @ W.T, W = q * scale per group of 32 inputs
        x [..., K] float; q [N_out, K] int8, row-major (QuantLinear.q with bits=8); scale
        [N_out, K / 32] float32 (QuantLinear.scale as float32); K % 32 == 0, else the twin;
        result [..., N_out] in x's dtype, accumulated in float32. Up to 16 rows: a GEMV kernel;
        longer inputs: dequantize 16M weights at a time and use a dense (tensor-core) matmul.

All kernels enqueue on the current stream and never synchronise, so they can be captured in a CUDA
graph.
"""
from __future__ import annotations

import logging
import re
import shutil
import threading
import warnings
from collections import Counter
from pathlib import Path

import torch

from . import kernel_cache
from .ops import torch_ref
from .placement import env_flag

KERNEL_DIR = kernel_cache.KERNEL_DIR
COMMON_LIBRARY = "rwkv_chat_ops"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_GEMV_MAX_ROWS = 16  # kInt8GemvMaxRows in kernels/rwkv_kernels.h
_DEQUANT_CHUNK = 1 << 24  # weights dequantized at a time on the long-input int8 path (32 MB in fp16)

log = logging.getLogger(__name__)

_lock = threading.Lock()
_libraries: dict[str, object] = {}  # library name -> torch.ops namespace
_failure: str | None = None  # first error line of a failed build; disables the kernels
_unsupported_warned: set[int] = set()
calls: Counter = Counter()  # kernel launches per op (benchmarks read it to see the routing work)


# ---------------------------------------------------------------------------------------------
# Availability


def enabled() -> bool:
    """RWKV_CUDA_ON=1 and torch sees a CUDA device (the kernels may still fail to build)."""
    return env_flag("RWKV_CUDA_ON") and torch.cuda.is_available()


def available_for(tensor) -> bool:
    """Should a call on `tensor` go to the CUDA kernels? Cheap; builds nothing."""
    return _failure is None and _is_cuda(tensor) and env_flag("RWKV_CUDA_ON")


def _is_cuda(tensor) -> bool:
    return tensor.is_cuda  # the CPU tests replace this to send CPU tensors down the kernel path


def load(head_size: int | None = None) -> bool:
    """Build/load the kernels now (v4 + int8, plus the WKV build for `head_size` if given) instead
    of at the first call; True when they are ready. Warns once and returns False on failure."""
    if not enabled():
        return False
    ready = _library(COMMON_LIBRARY, None) is not None
    if head_size is not None:
        ready = _library(wkv_library_name(head_size), head_size) is not None and ready
    return ready


def status() -> str:
    """One human-readable line for `rwkv-chat info` and the benchmarks."""
    if not env_flag("RWKV_CUDA_ON"):
        return "CUDA kernels: off (set RWKV_CUDA_ON=1 to use them)"
    if not torch.cuda.is_available():
        return f"CUDA kernels: off (torch {torch.__version__} sees no CUDA device)"
    if _failure is not None:
        return f"CUDA kernels: build failed ({_failure}); using the torch path"
    if not _libraries:
        nvcc = _nvcc()
        where = f"nvcc at {nvcc}" if nvcc else "no nvcc found: the build will fail"
        return f"CUDA kernels: on, built on first use ({where})"
    return f"CUDA kernels: on ({', '.join(sorted(_libraries))} loaded)"


def kernel_calls() -> dict[str, int]:
    """How many times each kernel ran since start-up."""
    return dict(calls)


def wkv_library_name(head_size: int) -> str:
    return f"rwkv_chat_wkv_hs{int(head_size)}"


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    candidate = Path(home) / "bin" / "nvcc" if home else None
    if candidate is not None and candidate.exists():
        return str(candidate)
    return shutil.which("nvcc")


# ---------------------------------------------------------------------------------------------
# Building and loading


def _library(name: str, head_size: int | None):
    """The torch.ops namespace of a built library, building it on first use; None if unavailable."""
    ops = _libraries.get(name)
    if ops is not None:
        return ops
    if head_size is not None and not _head_size_supported(head_size):
        return None
    with _lock:
        if name in _libraries:
            return _libraries[name]
        if _failure is not None:
            return None
        try:
            _build(name, head_size)
            ops = getattr(torch.ops, name)
        except Exception as error:  # a failed build must never take the model down
            _record_failure(error)
            return None
        _libraries[name] = ops
        return ops


def _head_size_supported(head_size: int) -> bool:
    if head_size % 4 == 0 and 4 <= head_size <= 256:
        return True
    if head_size not in _unsupported_warned:
        _unsupported_warned.add(head_size)
        warnings.warn(f"RWKV CUDA kernels support head sizes that are multiples of 4 up to 256, not "
                      f"{head_size}; using the torch path for it", RuntimeWarning, stacklevel=4)
    return False


def _build(name: str, head_size: int | None) -> None:
    """Compile (or find in torch's cache) and load one library. Tests replace this to fail."""
    from torch.utils.cpp_extension import load as load_extension

    if head_size is None:
        sources = ["ops.cpp", "wkv4.cu", "int8_matmul.cu"]
        defines = []
    else:
        sources = ["ops_wkv.cpp", "wkv5_6.cu", "wkv7.cu"]
        defines = [f"-DRWKV_HEAD_SIZE={int(head_size)}"]
    missing = [s for s in sources if not (KERNEL_DIR / s).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources missing from {KERNEL_DIR}: {', '.join(missing)}")
    log.info("building RWKV CUDA kernels %s (cached after the first time)", name)
    load_extension(
        name=name,
        build_directory=str(build_folder(name)),
        sources=[str(KERNEL_DIR / s) for s in sources],
        extra_include_paths=[str(KERNEL_DIR)],
        # hidden symbols: builds for several head sizes share kernel and launcher names, and one
        # process may load them all
        extra_cflags=["-O3", "-fvisibility=hidden", *defines],
        extra_cuda_cflags=["-O3", "-lineinfo", "-Xcompiler=-fvisibility=hidden", *defines],
        is_python_module=False,
        verbose=env_flag("RWKV_CUDA_VERBOSE"),
    )


def build_folder(name: str) -> Path:
    """The private folder a CUDA library is built and cached in (kernel_cache.UnsafeCacheError
    when it or the cache folder could be written by someone else)."""
    root = kernel_cache.private_folder(kernel_cache.default_root())
    return kernel_cache.private_folder(root / f"cuda-{name}")


def _record_failure(error: BaseException) -> None:
    global _failure
    _failure = first_error_line(f"{type(error).__name__}: {error}")
    warnings.warn(
        f"RWKV CUDA kernels could not be built; using the torch path instead. {_failure} "
        "(RWKV_CUDA_VERBOSE=1 shows the whole build log)",
        RuntimeWarning,
        stacklevel=5,
    )


def first_error_line(text: str) -> str:
    """The line of a build log that says what went wrong (the first one mentioning an error)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("[", "FAILED:")) or re.match(r"(\w+: )?Error building extension", line):
            continue  # ninja's progress and command lines, torch's summary
        if re.search(r"(^|[\s:])(fatal )?error\b", line, re.IGNORECASE):
            return line[:300]
    return lines[0][:300] if lines else "unknown error"


# ---------------------------------------------------------------------------------------------
# Kernels (with the twins as fallback)


def _ops_for(tensor, name: str, head_size: int | None):
    """The built library for a call on `tensor`, or None (then the twin runs). RWKV_CUDA_ON is not
    read here: the caller decided at load (ops/select.py, Int8Linear) that the kernels are wanted."""
    if _failure is not None or not _is_cuda(tensor):
        return None
    return _library(name, head_size)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _state_for(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(state_in, state_out) for a kernel that reads one and writes the other, with a batch row."""
    state_in = _aligned(_float32(state)).unsqueeze(0)
    return state_in, torch.empty_like(state_in)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or an aligned copy when it is a view starting off a 16-byte boundary (vector loads)."""
    return t.clone() if t.data_ptr() % 16 else t


def _batched(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.unsqueeze(0) for t in tensors]


def wkv4(k, v, decay, first, aa, bb, pp):
    """RWKV-4 WKV (see the module docstring for layouts) -> (out, aa, bb, pp)."""
    ops = _ops_for(k, COMMON_LIBRARY, None)
    if ops is None:
        return torch_wkv4(k, v, decay, first, aa, bb, pp)
    dtype = k.dtype if k.dtype in _FLOATS else torch.float32
    k_, v_ = _batched(*(t.to(dtype).contiguous() for t in (k, v)))
    states = [s.to(torch.float32, memory_format=torch.contiguous_format, copy=True).unsqueeze(0) for s in (aa, bb, pp)]
    out = torch.empty_like(k_)
    ops.wkv4(k_, v_, _float32(decay), _float32(first), *states, out)
    calls["wkv4"] += 1
    return out[0], *(s[0] for s in states)


def wkv5(r, k, v, decay, bonus, state):
    """RWKV-5.2 / RWKV-6 WKV (see the module docstring for layouts) -> (out, state)."""
    head_size = r.shape[-1]
    ops = _ops_for(r, wkv_library_name(head_size), head_size)
    if ops is None:
        return torch_wkv5(r, k, v, decay, bonus, state)
    H, N = r.shape[-2], head_size
    dtype = r.dtype if r.dtype in _FLOATS else torch.float32
    r_, k_, v_ = _batched(*(t.to(dtype).contiguous() for t in (r, k, v)))
    per_token = decay.numel() != H * N
    decay_ = _float32(decay).reshape(r_.shape if per_token else (H, N))
    state_in, state_out = _state_for(state)
    out = torch.empty_like(r_)
    ops.wkv5(r_, k_, v_, decay_, _float32(bonus).reshape(H, N), state_in, state_out, out)
    calls["wkv6" if per_token else "wkv5"] += 1
    return out[0], state_out[0]


def wkv7(r, decay, k, v, kk, a, state):
    """RWKV-7 WKV (see the module docstring for layouts) -> (out, state)."""
    head_size = r.shape[-1]
    ops = _ops_for(r, wkv_library_name(head_size), head_size)
    if ops is None:
        return torch_wkv7(r, decay, k, v, kk, a, state)
    dtype = r.dtype if r.dtype in _FLOATS else torch.float32
    r_, k_, v_, kk_, a_ = _batched(*(t.to(dtype).contiguous() for t in (r, k, v, kk, a)))
    decay_ = _float32(decay).reshape(r.shape).unsqueeze(0)
    state_in, state_out = _state_for(state)
    out = torch.empty_like(r_)
    ops.wkv7(r_, decay_, k_, v_, kk_, a_, state_in, state_out, out)
    calls["wkv7"] += 1
    return out[0], state_out[0]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ W.T, W = q * scale per group of 32 inputs, in x's dtype (see the module docstring)."""
    K = x.shape[-1]
    ops = _ops_for(x, COMMON_LIBRARY, None) if K % 32 == 0 and x.dtype in _FLOATS else None
    if ops is None:
        return torch_int8_matmul(x, q, scale)
    N = q.shape[0]
    flat = _aligned(x.reshape(-1, K).contiguous())
    q_ = _aligned(q.contiguous())
    scale_ = _float32(scale)
    M = flat.shape[0]
    if M <= _GEMV_MAX_ROWS:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        ops.int8_matmul(flat, q_, scale_, y)
        calls["int8_gemv"] += 1
    else:  # long inputs: dense matmuls on dequantized slices of the weight
        rows = max(1, min(N, _DEQUANT_CHUNK // K))
        pieces = []
        for start in range(0, N, rows):
            part = q_[start:start + rows]
            w = torch.empty(part.shape, dtype=x.dtype, device=x.device)
            ops.int8_dequantize(part, scale_[start:start + rows].contiguous(), w)
            pieces.append(flat @ w.t())
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        calls["int8_dequant_matmul"] += 1
    return y.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------
# Plain-torch twins: same signatures and layouts, ops/torch_ref.py in the kernels' dtypes (fallback)


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in _FLOATS else torch.float32


def torch_wkv4(k, v, decay, first, aa, bb, pp):
    out, aa, bb, pp = torch_ref.wkv4(*(t.float() for t in (k, v, decay, first, aa, bb, pp)))
    return out.to(_out_dtype(k)), aa, bb, pp


def torch_wkv5(r, k, v, decay, bonus, state):
    H, N = r.shape[-2], r.shape[-1]
    per_token = decay.numel() != H * N
    w = decay.float().reshape((r.shape[0], H, N, 1) if per_token else (H, N, 1))
    out, state = torch_ref.wkv5(r.float(), k.float(), v.float(), w, bonus.float().reshape(H, N, 1), state.float())
    return out.to(_out_dtype(r)), state


def torch_wkv7(r, decay, k, v, kk, a, state):
    out, state = torch_ref.wkv7(r.float(), decay.float().reshape(r.shape), k.float(), v.float(), kk.float(),
                             a.float(), state.float())
    return out.to(_out_dtype(r)), state


def torch_int8_matmul(x, q, scale):
    """QuantLinear's int8 math (scale [N, K / 32]), accumulated in float32 (the kernels' reference)."""
    N, K = q.shape
    groups = scale.numel() // N  # ceil(K / 32): the last group may be short
    w = torch.nn.functional.pad(q.float(), (0, 32 * groups - K)).view(N, groups, 32) * scale.float().view(N, groups, 1)
    return (x.float() @ w.view(N, -1)[:, :K].t()).to(_out_dtype(x))

