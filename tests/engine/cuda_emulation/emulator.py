"""Run the CUDA kernel sources on the CPU through the host emulation (emulation.h, harness.cpp).

`build_emulator(head_size, folder)` compiles harness.cpp with g++ into a shared library and returns
an `Emulator` whose methods have the signatures of `rwkv_chat.engine.cuda`'s kernels (unbatched
[T, H, N] or batched [B, T, H, N] CPU tensors), so tests can run the same cases on the emulator and
on a real GPU. `emulation_unavailable()` says why it cannot be built here (no g++, no CUDA headers).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

from rwkv_chat.engine import cuda

HERE = Path(__file__).resolve().parent
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_int, _ptr = ctypes.c_int, ctypes.c_void_p


class Wkv4Problem(ctypes.Structure):
    _fields_ = [("B", _int), ("T", _int), ("C", _int), ("k", _ptr), ("v", _ptr), ("decay", _ptr),
                ("first", _ptr), ("aa", _ptr), ("bb", _ptr), ("pp", _ptr), ("y", _ptr)]


class Wkv5Problem(ctypes.Structure):
    _fields_ = [("B", _int), ("T", _int), ("H", _int), ("per_token_decay", ctypes.c_bool), ("r", _ptr),
                ("k", _ptr), ("v", _ptr), ("decay", _ptr), ("bonus", _ptr), ("state_in", _ptr),
                ("state_out", _ptr), ("y", _ptr)]


class Wkv7Problem(ctypes.Structure):
    _fields_ = [("B", _int), ("T", _int), ("H", _int), ("r", _ptr), ("decay", _ptr), ("k", _ptr), ("v", _ptr),
                ("kk", _ptr), ("a", _ptr), ("state_in", _ptr), ("state_out", _ptr), ("y", _ptr)]


class Int8MatmulProblem(ctypes.Structure):
    _fields_ = [("M", _int), ("K", _int), ("N", _int), ("x", _ptr), ("q", _ptr), ("scale", _ptr), ("y", _ptr)]


def cuda_include_dir() -> Path | None:
    """A folder holding cuda_runtime.h / cuda_fp16.h / cuda_bf16.h (from nvcc's install)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent / "include")
        # a wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`) names the real install
        try:
            text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 4096 else ""
        except OSError:
            text = ""
        for word in text.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parent.parent / "include")
    candidates += sorted(Path("/usr/local").glob("cuda*/include"), reverse=True)
    for folder in candidates:
        if (folder / "cuda_runtime.h").is_file() and (folder / "cuda_bf16.h").is_file():
            return folder
    return None


def emulation_unavailable() -> str | None:
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include_dir() is None:
        return "no CUDA headers (cuda_runtime.h, cuda_bf16.h) found: install the CUDA toolkit / nvcc"
    return None


def build_emulator(head_size: int, folder: Path) -> "Emulator":
    library = Path(folder) / f"rwkv_emulated_hs{head_size}.so"
    command = [
        # hidden symbols, no GNU-unique ones: two builds (two head sizes) loaded into one process
        # must not share template instances or their static (shared-memory) arrays
        "g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
        "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-gnu-unique",
        f"-DRWKV_HEAD_SIZE={head_size}", f"-I{cuda.KERNEL_DIR}", f"-I{cuda_include_dir()}", f"-I{HERE}",
        str(HERE / "harness.cpp"), "-o", str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the kernel emulation failed:\n{result.stderr[-4000:]}")
    return Emulator(ctypes.CDLL(str(library)))


def _p(t: torch.Tensor) -> int:
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


class Emulator:
    """The kernels of rwkv_chat/kernels/ run on the CPU; signatures as in rwkv_chat.engine.cuda."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.head_size = lib.emu_head_size()

    def wkv4(self, k, v, decay, first, aa, bb, pp):
        B, T, C = (1, *k.shape) if k.dim() == 2 else k.shape
        k_, v_ = k.contiguous(), v.to(k.dtype).contiguous()
        decay_, first_ = decay.float().contiguous(), first.float().contiguous()
        aa_, bb_, pp_ = (s.float().clone().contiguous() for s in (aa, bb, pp))
        y = torch.empty_like(k_)
        problem = Wkv4Problem(B, T, C, _p(k_), _p(v_), _p(decay_), _p(first_), _p(aa_), _p(bb_), _p(pp_), _p(y))
        self.lib.emu_wkv4(_DTYPES[k.dtype], ctypes.byref(problem))
        return y, aa_, bb_, pp_

    def wkv5(self, r, k, v, decay, bonus, state, *, inplace: bool = False):
        B, T, H, N = (1, *r.shape) if r.dim() == 3 else r.shape
        assert N == self.head_size
        r_, k_, v_ = (t.to(r.dtype).contiguous() for t in (r, k, v))
        per_token = decay.numel() != H * N
        decay_, bonus_ = decay.float().contiguous(), bonus.float().contiguous()
        state_in = state if inplace else state.float().contiguous()
        state_out = state_in if inplace else torch.empty_like(state_in)
        y = torch.empty_like(r_)
        problem = Wkv5Problem(B, T, H, per_token, _p(r_), _p(k_), _p(v_), _p(decay_), _p(bonus_), _p(state_in),
                              _p(state_out), _p(y))
        self.lib.emu_wkv5(_DTYPES[r.dtype], ctypes.byref(problem))
        return y, state_out

    def wkv7(self, r, decay, k, v, kk, a, state, *, inplace: bool = False):
        B, T, H, N = (1, *r.shape) if r.dim() == 3 else r.shape
        assert N == self.head_size
        r_, k_, v_, kk_, a_ = (t.to(r.dtype).contiguous() for t in (r, k, v, kk, a))
        decay_ = decay.float().contiguous()
        state_in = state if inplace else state.float().contiguous()
        state_out = state_in if inplace else torch.empty_like(state_in)
        y = torch.empty_like(r_)
        problem = Wkv7Problem(B, T, H, _p(r_), _p(decay_), _p(k_), _p(v_), _p(kk_), _p(a_), _p(state_in),
                              _p(state_out), _p(y))
        self.lib.emu_wkv7(_DTYPES[r.dtype], ctypes.byref(problem))
        return y, state_out

    def int8_matmul(self, x, q, scale):
        """The GEMV kernel (any number of rows here, the wrapper's dequantize path aside)."""
        K, N = x.shape[-1], q.shape[0]
        flat = x.reshape(-1, K).contiguous()
        q_, scale_ = q.contiguous(), scale.float().contiguous()
        y = torch.empty(flat.shape[0], N, dtype=x.dtype)
        problem = Int8MatmulProblem(flat.shape[0], K, N, _p(flat), _p(q_), _p(scale_), _p(y))
        self.lib.emu_int8_matmul(_DTYPES[x.dtype], ctypes.byref(problem))
        return y.reshape(*x.shape[:-1], N)

    def int8_dequantize(self, q, scale, dtype):
        q_, scale_ = q.contiguous(), scale.float().contiguous()
        w = torch.empty(q.shape, dtype=dtype)
        self.lib.emu_int8_dequantize(_DTYPES[dtype], q.shape[0], q.shape[1], ctypes.c_void_p(_p(q_)),
                                     ctypes.c_void_p(_p(scale_)), ctypes.c_void_p(_p(w)))
        return w
