"""Optional C kernels for the CPU: built once with the system C compiler, loaded with ctypes.

The C source is `kernels/cpu/rwkv_cpu.c` with its header `rwkv_cpu.h` (package data, like the CUDA
sources); the header describes every kernel.

`get()` returns the loaded kernels, or None when they cannot be used (no compiler, not x86/ARM
Linux/macOS, a failed build, or `RWKV_CPU_KERNELS=0`); every caller then takes a plain-torch
path that computes the same thing. The shared library is cached in a private folder under the
user cache folder (`RWKV_CHAT_KERNEL_DIR` overrides), keyed by a hash of the source, the compiler
and the CPU, so a build (~2 s) happens once per machine; kernel_cache.py checks the folder and
the file (owner, permissions, recorded SHA-256) before anything is loaded.

Threads: the kernels run on the calling thread plus `torch.get_num_threads() - 1` helper threads
of their own, which join a call only when they are awake (see the C source). While one token is
decoded (`Kernels.token_mode`), torch itself is held at one thread and the helpers keep spinning.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import sys
import threading
import warnings
from array import array
from pathlib import Path

import torch

from . import kernel_cache

K_F32, K_BF16, K_I8, K_I4, K_BF16_WIDE = 0, 1, 2, 3, 4  # wide: bf16 weights times the fp32 x as it is
LAYOUT_COLS = 16
X_BF16, Y_BF16 = 256, 512
BLOCKS = 1024  # int8 / int4 rows stored in quant.BLOCK blocks (quant.block_order)
ACT8 = 2048  # int8 rows times x rounded to int8 per group of 32 (strategy i8a8)
_SHORT_SPIN, _DECODE_SPIN = 2_000, 200_000  # pause instructions a helper spins before sleeping
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-fno-math-errno", "-std=gnu11", "-pthread"]

_lock = threading.Lock()
_loaded: "Kernels | None | bool" = False  # False: not tried yet


SOURCE_DIR = kernel_cache.KERNEL_DIR / "cpu"
_MAIN, _HEADER = "rwkv_cpu.c", "rwkv_cpu.h"


def source() -> str:
    """The C source as one text (the header pasted where the .c file includes it): what is
    compiled and what the cache key hashes."""
    try:
        main = (SOURCE_DIR / _MAIN).read_text(encoding="utf-8")
        header = (SOURCE_DIR / _HEADER).read_text(encoding="utf-8")
    except OSError as error:
        raise kernel_cache.KernelCacheError(f"the CPU kernel source is missing ({error})") from error
    include = f'#include "{_HEADER}"'
    if include not in main:
        raise kernel_cache.KernelCacheError(f"{SOURCE_DIR / _MAIN} does not include {_HEADER}")
    return main.replace(include, header, 1)


def _enabled() -> bool:
    return os.environ.get("RWKV_CPU_KERNELS", "").strip() != "0"


def _cache_dir() -> Path:
    return kernel_cache.default_root()


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def library_name(cc: list[str], flags: list[str] = _FLAGS) -> str:
    """The cache file name: a hash of the source, the compiler (and its version), the flags and the CPU."""
    proc = kernel_cache.run_compiler([cc[0], "--version"])
    key = hashlib.sha256("\0".join([source(), " ".join(cc), proc.stdout, " ".join(flags),
                                     _cpu_signature()]).encode()).hexdigest()[:16]
    return f"rwkv_cpu_{key}.so"


def _load(target: str = "-march=native", folder: Path | None = None) -> Kernels:
    """Build (once per machine) and load the kernels through the verified cache (kernel_cache.py)."""
    flags = [target if flag == "-march=native" else flag for flag in _FLAGS]
    name = library_name(kernel_cache.compiler(), flags)
    return kernel_cache.load_or_build(folder or _cache_dir(), name, source(), [*flags, "{src}", "-o", "{out}", "-lm"],
                                      Kernels)


def for_target(target: str, folder: Path) -> Kernels:
    """The kernels compiled for another CPU than this one (`-march=x86-64-v3`: AVX2 without AVX-512),
    cached in `folder`: how the tests run the code paths of other machines on this one."""
    return _load(target, folder)


def _new_states(layers) -> tuple[list[list[list[torch.Tensor]]], array]:
    """For each layer's sequences' (att_x, wkv, ffn_x): new tensors like them, and the six pointers
    per sequence the one-call layers read and write (att in / out, ffn in / out, wkv in / out)."""
    new_states, table = [], []
    with torch.inference_mode(False):  # ordinary tensors: RWKVState.made_ordinary has nothing to do
        for states in layers:
            new_layer = []
            for att_x, wkv, ffn_x in states:
                new = [torch.empty_like(att_x), torch.empty_like(wkv), torch.empty_like(ffn_x)]
                new_layer.append(new)
                table += (att_x.data_ptr(), new[0].data_ptr(), ffn_x.data_ptr(), new[2].data_ptr(), wkv.data_ptr(),
                          new[1].data_ptr())
            new_states.append(new_layer)
    return new_states, array("q", table)


class Kernels:
    """Thin ctypes wrappers; every tensor argument must be a contiguous CPU tensor."""

    def __init__(self, library: kernel_cache.Library):
        lib = ctypes.CDLL(library.load_path)  # the file kernel_cache opened and verified
        lib.rk_gemv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        lib.rk_gemv.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.rk_wkv4.argtypes = [i64, i64] + [ptr] * 11 + [ctypes.c_int]
        lib.rk_wkv5.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
        lib.rk_wkv7.argtypes = [i64, i64, i64] + [ptr] * 9 + [ctypes.c_int]
        lib.rk_dequant_groups.argtypes = [ctypes.c_int, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
        lib.rk_group_norm_gate.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_float, ptr, ctypes.c_int,
                                           ctypes.c_int, ptr]
        lib.rk_v7_step.argtypes = [i64, i64, ctypes.c_int] + [ptr] * 20
        lib.rk_v7_layer.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
        lib.rk_v6_layer.argtypes = [ptr, i64, ptr, ptr, ctypes.c_int]
        lib.rk_layers.argtypes = [ctypes.c_int, i64, ptr, i64, ptr, ptr, ptr, ctypes.c_int]
        for fn in (lib.rk_wkv4, lib.rk_wkv5, lib.rk_wkv7, lib.rk_dequant_groups, lib.rk_group_norm_gate,
                   lib.rk_v7_step, lib.rk_v7_layer, lib.rk_v6_layer, lib.rk_layers):
            fn.restype = None
        lib.rk_gemm_bf16.argtypes = [i64, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int, ctypes.c_int]
        lib.rk_gemm_bf16.restype = ctypes.c_int
        lib.rk_gemm_bf16_native.restype = ctypes.c_int
        self.native_bf16_gemm = bool(lib.rk_gemm_bf16_native())
        lib.rk_simd.restype = ctypes.c_int
        self.simd = lib.rk_simd()  # 2: AVX-512 tiles, 1: AVX2 tiles, 0: portable loops only
        lib.rk_set_spin.argtypes = [ctypes.c_int]
        lib.rk_set_spin.restype = None
        lib.rk_set_team.argtypes = [ptr, ctypes.c_int]
        lib.rk_set_team.restype = None
        lib.rk_set_team(_torch_gomp_parallel(), 0)
        self.lib = lib
        self.library = library  # holds the verified file open while the library is in use
        self.path = library.path
        self._threads: int | None = None  # the kernels' thread count while torch is held at one

    def threads(self) -> int:
        return self._threads or torch.get_num_threads()

    @contextlib.contextmanager
    def token_mode(self, n_tokens: int):
        """Thread settings for a forward call of `n_tokens` tokens.

        One token (decode) is a chain of small kernel calls with tiny torch ops between them:
        torch runs those on one thread, while the kernels keep every thread and their helpers
        spin between calls instead of sleeping (waking a sleeping thread takes longer than a
        768x768 product). Longer inputs spend their time in torch's GEMMs, so the helpers go
        back to sleeping quickly and leave the cores to torch."""
        if self._threads is not None:  # already held for a decode loop (see RWKV.decoding)
            yield
            return
        n = torch.get_num_threads()
        if n_tokens != 1 or n <= 1:
            self.lib.rk_set_spin(_SHORT_SPIN)
            self.lib.rk_set_team(None, 1)  # parallel work on torch's threads, which are awake between its ops
            try:
                yield
            finally:
                self.lib.rk_set_team(None, 0)
            return
        self._threads = n
        torch.set_num_threads(1)
        self.lib.rk_set_spin(_DECODE_SPIN)
        try:
            yield
        finally:
            torch.set_num_threads(n)
            self._threads = None

    def dequantize(self, bits: int, q, scale, start: int, stop: int, n_in: int, dtype, blocks: bool = False):
        """Rows start..stop of a group-wise int8/int4 weight (quant.py's format; `blocks`: stored in
        the kernels' block order) as [rows, n_in] in dtype (fp32 or bf16)."""
        out = torch.empty((stop - start, n_in), dtype=dtype)
        self.lib.rk_dequant_groups(bits | (BLOCKS if blocks else 0), start, stop, n_in, q.data_ptr(), scale.data_ptr(),
                                   out.data_ptr(), int(dtype == torch.bfloat16), self.threads())
        return out

    def gemm_bf16(self, x: torch.Tensor, weight: torch.Tensor, cols: bool = False) -> torch.Tensor:
        """x [T, K] fp32 (contiguous) times a bf16 weight [N, K] transposed (cols: [K, N], as it is):
        [T, N] fp32, the products of x rounded to bf16 summed in fp32."""
        T, K = x.shape
        N = weight.shape[1] if cols else weight.shape[0]
        y = torch.empty((T, N), dtype=torch.float32)
        if self.lib.rk_gemm_bf16(T, N, K, x.data_ptr(), weight.data_ptr(), y.data_ptr(), N, int(cols), self.threads()) != 0:
            raise MemoryError("rk_gemm_bf16: no memory for the bf16 copy of the input")
        return y

    def gemv_words(self, words) -> None:
        """Weight-times-vector jobs given as an array('q') of 8 words each (job_t in the C source:
        weight, scale, x, y, n_out, n_in, flags, tag), run in one parallel task."""
        address, length = words.buffer_info()
        if self.lib.rk_gemv(length // 8, address, self.threads()) != 0:
            raise RuntimeError("rk_gemv: too many jobs in one call")

    def group_norm_gate(self, x, n_head, ln_w, ln_b, eps, g=None, silu=False, dtype=torch.float32):
        """GroupNorm over heads of one token x ([C] fp32), times g (or silu(g)); returns [1, C] in dtype.
        ln_w/ln_b and g: contiguous fp32 or bf16 (g in `dtype`)."""
        C = x.numel()
        y = torch.empty((1, C), dtype=dtype)
        mode = 0 if g is None else (2 if silu else 1)
        self.lib.rk_group_norm_gate(n_head, C // n_head, x.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(),
                                    int(ln_w.dtype == torch.bfloat16), eps, 0 if g is None else g.data_ptr(), mode,
                                    int(dtype == torch.bfloat16), y.data_ptr())
        return y

    def v7_step(self, w, r, k, v, w_lora, a_lora, g, v_lora, v_first, state):
        """One token of RWKV-7 time mixing after the projections (see rk_v7_step). All vectors are
        contiguous [1, C] tensors of one dtype (fp32 or bf16) except w.w0 (fp32); returns
        (output projection input, mixed v, new state)."""
        dtype = r.dtype
        C = r.numel()
        y = torch.empty((1, C), dtype=dtype)
        v_out = torch.empty((1, C), dtype=dtype)
        new_state = torch.empty_like(state)
        ptr = lambda t: 0 if t is None else t.data_ptr()
        self.lib.rk_v7_step(w.n_head, C // w.n_head, int(dtype == torch.bfloat16), r.data_ptr(), k.data_ptr(),
                            v.data_ptr(), w_lora.data_ptr(), a_lora.data_ptr(), g.data_ptr(), ptr(v_lora),
                            ptr(v_first), w.w0.data_ptr(), w.a0.data_ptr(), w.k_k.data_ptr(), w.k_a.data_ptr(),
                            ptr(getattr(w, "v0", None)), w.r_k.data_ptr(), w.ln_x[0].data_ptr(), w.ln_x[1].data_ptr(),
                            state.data_ptr(), new_state.data_ptr(), y.data_ptr(), v_out.data_ptr())
        return y, v_out, new_state

    def layer(self, version, layer, x, states, v_first=None):
        """One token of each of B sequences through a whole RWKV-7 or RWKV-6 layer (rk_v7_layer /
        rk_v6_layer); B = 1 for a single conversation. `layer`: the array of words ops.cpu made at
        load; x: [B, C] fp32, updated in place; states: for each sequence its (att_x, wkv, ffn_x),
        read in place; v_first (v7): fp32 [B, C] after layer 0, None in it. Returns (for each
        sequence its new [att_x, wkv, ffn_x], v_first)."""
        (new_states,), words = _new_states([states])
        if version == "6":
            self.lib.rk_v6_layer(layer.buffer_info()[0], x.shape[0], x.data_ptr(), words.buffer_info()[0],
                                 self.threads())
            return new_states, v_first
        first_out = torch.empty_like(x) if v_first is None else None
        self.lib.rk_v7_layer(layer.buffer_info()[0], x.shape[0], x.data_ptr(), words.buffer_info()[0],
                             0 if v_first is None else v_first.data_ptr(),
                             0 if first_out is None else first_out.data_ptr(), self.threads())
        return new_states, (first_out if v_first is None else v_first)

    def layers(self, version, addresses, x, states):
        """One token of each of B sequences through every layer in one call (rk_layers): `addresses`
        an array('q') of the layers' word arrays, x [B, C] fp32 updated in place, states[i] the
        sequences' (att_x, wkv, ffn_x) in layer i. Returns the new states, [layer][sequence]."""
        new_states, words = _new_states(states)
        v_first = torch.empty_like(x)
        self.lib.rk_layers(int(version), len(addresses), addresses.buffer_info()[0], x.shape[0], x.data_ptr(),
                           words.buffer_info()[0], v_first.data_ptr(), self.threads())
        return new_states

    def wkv4(self, k, v, w, u, aa, bb, pp):
        T, C = k.shape
        out = torch.empty_like(k)
        aa2, bb2, pp2 = torch.empty_like(aa), torch.empty_like(bb), torch.empty_like(pp)
        self.lib.rk_wkv4(T, C, k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr(), aa.data_ptr(), bb.data_ptr(),
                         pp.data_ptr(), aa2.data_ptr(), bb2.data_ptr(), pp2.data_ptr(), out.data_ptr(),
                         self.threads())
        return out, aa2, bb2, pp2

    def wkv5(self, r, k, v, w, u, state):
        T, H, N = r.shape
        out = torch.empty_like(r)
        new_state = torch.empty_like(state)
        w_stride = H * N if w.dim() == 3 else 0
        self.lib.rk_wkv5(T, H, N, r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), w_stride, u.data_ptr(),
                         state.data_ptr(), new_state.data_ptr(), out.data_ptr(), self.threads())
        return out, new_state

    def wkv7(self, r, w, k, v, kk, a, state):
        T, H, N = r.shape
        out = torch.empty_like(r)
        new_state = torch.empty_like(state)
        self.lib.rk_wkv7(T, H, N, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), kk.data_ptr(), a.data_ptr(),
                         state.data_ptr(), new_state.data_ptr(), out.data_ptr(), self.threads())
        return out, new_state


def _torch_gomp_parallel() -> int | None:
    """The address of GOMP_parallel in the OpenMP runtime torch loaded (libgomp; LLVM's and Intel's
    runtimes export it too), or None: the kernels then always use their own pool."""
    folder = Path(torch.__file__).parent / "lib"
    candidates = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
        candidates += sorted(loaded, key=lambda path: not path.startswith(str(folder)))  # torch's own first
    candidates += [str(p) for pattern in ("libgomp*", "libomp*", "libiomp*") for p in sorted(folder.glob(pattern))]
    for path in candidates:
        with contextlib.suppress(OSError, AttributeError):
            return ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
    return None


def ready() -> bool:
    """Whether get() has the kernels at hand without compiling them: loaded, disabled, not built on
    this system, or already in the cache for this machine. False before a first build."""
    if _loaded is not False or not _enabled() or sys.platform not in ("linux", "darwin"):
        return True
    try:
        folder = kernel_cache.private_folder(_cache_dir())
        library = kernel_cache.open_verified(folder, library_name(kernel_cache.compiler(), _FLAGS))
    except Exception:  # no compiler, an unsafe cache: get() reports it
        return True
    if library is None:
        return False
    library.close()
    return True


def get() -> Kernels | None:
    """The CPU kernels, building them on first use; None when unavailable or disabled."""
    global _loaded
    if not _enabled():
        return None
    if _loaded is not False:
        return _loaded  # type: ignore[return-value]
    with _lock:
        if _loaded is False:
            try:
                if sys.platform not in ("linux", "darwin"):
                    raise RuntimeError(f"not built on {sys.platform}")
                _loaded = _load()
            except Exception as error:  # any failure: fall back to plain torch
                warnings.warn(f"rwkv-chat: CPU kernels unavailable, using plain torch ({error})", RuntimeWarning,
                              stacklevel=2)
                _loaded = None
    return _loaded  # type: ignore[return-value]
