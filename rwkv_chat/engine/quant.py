"""Linear layers with one call interface, `linear(x) -> x @ W.T`, whatever the weight format.

Weights arrive in the checkpoint layout [out, in]. Quantizing happens once, at load, and so does
the choice of how each linear runs (its "paths"), from the device, the dtype and the kernels.

Formats:
* DenseLinear: fp32 / bf16 / fp16 weights.
* QuantLinear: weight-only int8 (`i8`) or int4 (`i4`) in groups of GROUP = 32 inputs with one
  fp16 scale each, llama.cpp's Q8_0 / Q4_0 blocks: W[o, k] ~= q[o, k] * scale[o, k // 32].
  int8: q in [-127, 127], scale = the group's max |w| / 127. int4: q in [-8, 7] (stored as
  q + 8 in nibbles, see `pack4`), scale chosen per group from a few candidates to minimise the
  squared error (the max-|w| / -8 of Q4_0 is one of them), then refitted (`_best_int4`). 8.5 and
  4.5 bits per weight.
  With `act8` (strategy `i8a8`) the GEMV kernels' input (up to KERNEL_ROWS rows: decode and a
  server's batches) is rounded to int8 per group of 32 too (scale: the group's max |x| / 127),
  as llama.cpp's Q8_0 x Q8_0 dot does: one VNNI instruction per 64 multiply-adds instead of two,
  which pays where a batch makes the products compute-bound. Plain `i8` rounds x to int16 for
  the whole vector, which keeps it 1.2-7x closer to fp32 than Q8_0. Prompts take the same GEMMs
  as `i8` (the kernels' int8 x int8 tiles reach ~87 GMAC/s a core here, the bf16 GEMM ~100).

On the CPU a single token (x of shape [1, in]), or a few (up to KERNEL_ROWS: a server's batch, a
short prompt), goes to the C kernels of `cpu_kernels` when they are available: weights stream from
memory once for all rows, fp32 accumulation, no per-call conversion, and each row's result is
bitwise the one it gets alone. Where the kernels run them, int8 / int4 weights are stored in their
block order (`block_order`). Longer inputs (prefill) use GEMMs: torch's for fp32 (MKL) and for
bf16 activations (oneDNN); for bf16 weights under fp32 activations (placement.cpu_activations) the
kernels' bf16 GEMM with fp32 results where the CPU has AVX-512 BF16, else torch's fp32 GEMM on the
weights widened a block at a time. Quantized weights are first expanded (to fp32, or to bf16 for
that bf16 GEMM) a block of rows at a time by the C kernels, so that the activations are not
rounded to 8 bits (i8a8 included). Elsewhere (CUDA, MPS, no kernels) the reference math runs: the
same expansion in torch, then a matmul (CUDA int8: the kernels of cuda.py).

Layouts: "rows" keeps the checkpoint's [out, in] (a dot product per output); "cols" stores
[in, out] so that a single token only reads the rows of the inputs that are nonzero: the FFN's
value projection takes relu(k)^2, which is mostly zeros. "cols" is used only for float weights
where the kernels run (CPU); every other linear is "rows".
"""
from __future__ import annotations

from array import array

import torch
import torch.nn.functional as F

from . import cpu_kernels, cuda, memory

GROUP = 32  # weights per scale along the input dimension
BLOCK = 256  # the C kernels' int8 / int4 storage block: 8 groups interleaved (block_order)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_DEQUANT_ELEMENTS = 1 << 22  # weights expanded at a time for a multi-token product (16 MiB in fp32)
_I4_CANDIDATES = tuple(8.5 - 0.25 * i for i in range(12))  # max|w| / c: the int4 scales tried per group


def _kernels_for(device, dtype):
    if torch.device(device).type != "cpu" or dtype not in _KERNEL_DTYPES:
        return None
    return cpu_kernels.get()


def _flags(kind: int, layout: str, dtype: torch.dtype) -> int:
    flags = kind | (cpu_kernels.LAYOUT_COLS if layout == "cols" else 0)
    if dtype == torch.bfloat16:
        flags |= cpu_kernels.X_BF16 | cpu_kernels.Y_BF16
    return flags


KERNEL_ROWS = 16  # inputs of up to this many rows go to the C kernels' GEMV (longer ones: the GEMMs)


def _by_output_blocks(n_out: int, n_in: int, product) -> torch.Tensor:
    """product(a, b) (the outputs a..b of a multi-token product, from weights expanded for them) for
    blocks of outputs whose weights take _DEQUANT_ELEMENTS at most, joined along the last axis."""
    step = max(1, _DEQUANT_ELEMENTS // n_in)
    pieces = [product(a, min(n_out, a + step)) for a in range(0, n_out, step)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def _kernel_rows(linear, x: torch.Tensor) -> bool:
    """Whether the C kernels multiply x: a few rows ([rows, in]) in the weight's dtype."""
    return linear._job is not None and x.dim() == 2 and 1 <= x.shape[0] <= KERNEL_ROWS and x.dtype == linear.dtype


def round_groups(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per group of GROUP along the last axis, round(x * 127 / m) * (m / 127) with
    m the group's max |x|, as i8a8's kernels multiply it; float again, in x's dtype."""
    n = x.shape[-1]
    padded = F.pad(x.float(), (0, -n % GROUP)).reshape(*x.shape[:-1], -1, GROUP)
    top = padded.abs().amax(dim=-1, keepdim=True)
    q = torch.round(padded * torch.where(top > 0, 127 / top, 0.0))
    return (q * (top / 127)).reshape(*x.shape[:-1], -1)[..., :n].to(x.dtype)


class DenseLinear:
    """Float weights. `weight` is [out, in] ("rows") or [in, out] ("cols").

    `dtype` is the activations' (x and the result); the weight is stored in `weights` when given
    (bf16 under fp32 activations on the CPU: placement.cpu_activations), else in `dtype`. Then a
    few rows (the GEMV kernels, bound by memory) widen the weights to fp32 and use x as it is,
    and more rows go to the kernels' bf16 GEMM, which rounds x to bf16 (llama.cpp's BF16), unless
    `widen` (small matrices whose inputs need the precision: the LoRA factors) or a CPU without
    bf16 products: then torch's fp32 GEMM takes the weights widened, a block at a time."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device, layout: str = "rows",
                 weights: torch.dtype | None = None, widen: bool = False):
        self.dtype = dtype
        stored = weights or dtype
        self.out_features, self.in_features = weight.shape
        kernels = _kernels_for(device, stored)
        self.layout = layout if kernels is not None else "rows"
        # always a copy, never a view of the (memory-mapped) checkpoint
        self.weight = memory.converted(weight, stored, transpose=self.layout == "cols").to(device)
        self._kernels = kernels
        self._job = None
        # many rows of fp32 x times bf16 weights: the kernels' bf16 GEMM (fp32 results) where the CPU
        # has bf16 products, else (and for `widen`) torch's fp32 GEMM on the weights widened
        self._gemm = kernels is not None and stored != dtype and not widen and kernels.native_bf16_gemm
        self._widen = stored != dtype and not self._gemm
        if kernels is not None:
            kind = cpu_kernels.K_F32 if stored == torch.float32 else cpu_kernels.K_BF16
            if stored != dtype and self.layout == "rows":
                kind = cpu_kernels.K_BF16_WIDE
            self._job = (self.weight.data_ptr(), 0, self.out_features, self.in_features, _flags(kind, self.layout, dtype), 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _kernel_rows(self, x):
            return run_group(((self, x),))[0]
        if self._gemm and x.dtype == self.dtype:
            flat = x.reshape(-1, self.in_features).contiguous()
            y = self._kernels.gemm_bf16(flat, self.weight, cols=self.layout == "cols")
            return y.reshape(*x.shape[:-1], self.out_features)
        if self._widen:  # x times the bf16 weight widened to x's dtype, a block of outputs at a time
            if self.layout == "cols":
                return _by_output_blocks(self.out_features, self.in_features,
                                         lambda a, b: x @ self.weight[:, a:b].to(x.dtype))
            return _by_output_blocks(self.out_features, self.in_features,
                                     lambda a, b: F.linear(x, self.weight[a:b].to(x.dtype)))
        return x @ self.weight if self.layout == "cols" else F.linear(x, self.weight)

    def on(self, device) -> "DenseLinear":
        """A copy for `device` (streamed layers): the weight moved, plain torch math."""
        clone = object.__new__(DenseLinear)
        clone.__dict__.update(self.__dict__, weight=self.weight.to(device, non_blocking=True), _kernels=None, _job=None,
                             _gemm=False, _widen=self.weight.dtype != self.dtype)
        return clone


class QuantLinear:
    """Weight-only int8 (bits=8) or int4 (bits=4) in groups of 32 inputs (module docstring).

    `q`: int8 [out, in] (bits 8) or uint8 [out, in32 / 2] nibbles (bits 4, in32 = in rounded up to
    32); `scale`: fp16 [out, in32 / 32]. Always the "rows" layout. `act8`: int8 with 8-bit inputs
    (the module docstring)."""

    layout = "rows"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device, bits: int, blocks: bool = True,
                 expand: torch.dtype | None = None, act8: bool = False):
        self.dtype, self.bits, self.act8 = dtype, bits, act8 and bits == 8  # dtype: the activations'
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_groups(weight, bits)
        self._kernels = _kernels_for(device, dtype)
        # what several tokens' products expand the weights to: bf16 under fp32 activations only
        # where the kernels' bf16 GEMM runs (else torch's fp32 GEMM)
        native = self._kernels is not None and self._kernels.native_bf16_gemm
        self._expand = expand if expand is not None and native else dtype
        # where the C kernels run it, q is stored in their block order (unless `blocks` is False:
        # a streamed layer, whose weights also go to other devices)
        self.blocks = self._kernels is not None and blocks
        tag = 0
        if self._kernels is not None and bits == 8 and not self.act8:  # the kernel's offset correction, one float per row (rwkv_cpu.h)
            self._corr = torch.cat([32768.0 * (_group_sums(q[a:b]) * scale[a:b].float()).sum(dim=1)
                                    for a, b in memory.row_blocks(q)])
            tag = self._corr.data_ptr()
        self.q = (to_blocks(q, bits, self.in_features) if self.blocks else q).to(device)
        self.scale = scale.to(device)
        self._job = None
        if self._kernels is not None:
            kind = cpu_kernels.K_I8 if bits == 8 else cpu_kernels.K_I4
            flags = _flags(kind, "rows", dtype) | (cpu_kernels.BLOCKS if self.blocks else 0)
            flags |= cpu_kernels.ACT8 if self.act8 else 0
            self._job = (self.q.data_ptr(), self.scale.data_ptr(), self.out_features, self.in_features, flags, tag)
        self._many = self._multi_token_path()

    def rows_q(self) -> torch.Tensor:
        """q in the plain [out, in] order of the module docstring, whatever the storage order."""
        return from_blocks(self.q, self.bits, self.in_features) if self.blocks else self.q

    def _multi_token_path(self):
        """How several tokens (or a token the C kernels do not take) run; decided once."""
        if self._kernels is not None:
            return self._expanded_matmul
        if self.q.device.type == "cuda" and self.bits == 8 and cuda.enabled():  # RWKV_CUDA_ON read once, here
            scale32 = self.scale.float()
            return lambda x: cuda.int8_matmul(x, self.q, scale32)
        return self._reference

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _kernel_rows(self, x):
            return run_group(((self, x),))[0]
        return self._many(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain math: weights expanded to x's dtype, then a matmul (float32 for fp16 on the CPU)."""
        dtype = torch.float32 if (x.dtype == torch.float16 and x.device.type == "cpu") else x.dtype
        w = dequantize(self.rows_q(), self.scale, self.bits, self.in_features).to(dtype)
        if self.act8 and x.dim() == 2 and x.shape[0] <= KERNEL_ROWS:  # as the kernels round it
            x = round_groups(x)
        return (x.to(dtype) @ w.t()).to(x.dtype)

    def _expanded_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Several tokens on the CPU: rows of weights expanded by the C kernels, then torch's GEMM."""
        flat = x.reshape(-1, self.in_features).contiguous()
        N, K = self.out_features, self.in_features
        expand = self._expand if x.dtype == self.dtype else x.dtype
        rows = lambda a, b: self._kernels.dequantize(self.bits, self.q, self.scale, a, b, K, expand, self.blocks)
        if expand != x.dtype:  # bf16 weights under fp32 activations: the kernels' GEMM
            y = _by_output_blocks(N, K, lambda a, b: self._kernels.gemm_bf16(flat, rows(a, b)))
        else:
            y = _by_output_blocks(N, K, lambda a, b: flat @ rows(a, b).t())
        return y.reshape(*x.shape[:-1], N)

    def on(self, device) -> "QuantLinear":
        """A copy for `device` (streamed layers): q and scale moved, the path for that device."""
        clone = object.__new__(QuantLinear)
        clone.__dict__.update(self.__dict__, q=self.rows_q().to(device, non_blocking=True),
                              scale=self.scale.to(device, non_blocking=True), _kernels=None, _job=None, blocks=False)
        clone._many = clone._multi_token_path()
        return clone


def block_order(n_in: int, length: int | None = None) -> torch.Tensor:
    """The kernels' storage order of a row of n_in inputs (stored in `length` >= n_in places, the
    int4 rows padded to whole groups): position p holds input block_order(n_in)[p].

    Each full BLOCK of 8 groups is stored as 4 chunks of 64, and lane l (4 bytes) of chunk j
    holds inputs 8j + 4 (l // 8) .. + 3 of group l % 8: every lane of every chunk belongs to one
    group, so a VNNI product sums a whole block in int32 before one scaling per group. Inputs
    past the last full block keep their order."""
    full = n_in // BLOCK * BLOCK
    p = torch.arange(full)
    chunk, lane, byte = (p % BLOCK) // 64, (p % 64) // 4, p % 4
    source = p // BLOCK * BLOCK + (lane % 8) * GROUP + chunk * 8 + (lane // 8) * 4 + byte
    return torch.cat([source, torch.arange(full, n_in if length is None else length)])


def to_blocks(q: torch.Tensor, bits: int, n_in: int) -> torch.Tensor:
    """q of QuantLinear's plain format -> the same weights in block_order (int4: repacked), in
    place, a block of rows at a time (no whole-matrix temporaries)."""
    order = block_order(n_in, q.shape[1] * (1 if bits == 8 else 2))
    for start, stop in memory.row_blocks(q):
        q[start:stop] = q[start:stop, order] if bits == 8 else pack4(unpack4(q[start:stop])[:, order])
    return q


def from_blocks(q: torch.Tensor, bits: int, n_in: int) -> torch.Tensor:
    """to_blocks' inverse."""
    values = q if bits == 8 else unpack4(q)
    plain = torch.empty_like(values)
    plain[:, block_order(n_in, values.shape[1])] = values
    return plain if bits == 8 else pack4(plain)


def _group_sums(q: torch.Tensor) -> torch.Tensor:
    """int8 q [out, in] -> the sum of each group of 32 as float [out, groups] (the last one may be short)."""
    rows, n = q.shape
    padded = F.pad(q.float(), (0, -n % GROUP))
    return padded.view(rows, -1, GROUP).sum(dim=-1)


def quantize_groups(weight: torch.Tensor, bits: int):
    """[out, in] float -> (q, fp16 scale) in QuantLinear's format; a block of rows at a time to
    bound the float temporaries."""
    rows, n = weight.shape
    groups = -(-n // GROUP)
    q = memory.empty((rows, n) if bits == 8 else (rows, groups * GROUP // 2), torch.int8 if bits == 8 else torch.uint8)
    scale = memory.empty((rows, groups), torch.float16)
    for start, stop in memory.row_blocks(weight):
        block = weight[start:stop]
        w = F.pad(block.float(), (0, groups * GROUP - n)).view(stop - start, groups, GROUP)
        memory.release(block)
        if bits == 8:
            s = (w.abs().amax(dim=-1) / 127).half()
            qs = _rounded(w, s, -127, 127)
            q[start:stop] = qs.reshape(stop - start, -1)[:, :n].to(torch.int8)
        else:
            s, qs = _best_int4(w)
            q[start:stop] = pack4(qs.reshape(stop - start, -1).to(torch.int8))
        scale[start:stop] = s
    return q, scale


def _rounded(w: torch.Tensor, s: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """round(w / s) clamped, with s the fp16 group scales (a zero scale gives zeros)."""
    s32 = s.float().unsqueeze(-1)
    nonzero = s32 != 0
    return torch.where(nonzero, torch.round(w / torch.where(nonzero, s32, 1.0)), 0.0).clamp_(low, high)


def _best_int4(w: torch.Tensor):
    """Per group of 32 [rows, groups, 32]: the fp16 scale among max|w| / c (signed so that the
    largest weight can use -8) with the smallest squared error, then refitted once by least
    squares for its q (kept where that helps), and the q in [-8, 7] of the scale chosen. On
    Gaussian weights the squared error is ~11% below that of Q4_0's max|w| / -8.

    A scale s with q = round(w / s) has error sum (q s - w)^2 = s^2 sum q^2 - 2 s sum q w + sum w^2;
    the last term is the same for every s, so only the first two are compared."""
    signed_max = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)

    def error(s):  # s: fp16 [rows, groups] -> the comparable part of the error
        s32 = s.float()
        q = _rounded(w, s, -8, 7)
        return s32 * (s32 * (q * q).sum(dim=-1) - 2 * (q * w).sum(dim=-1)), q

    best_s, best_err = None, None
    for c in _I4_CANDIDATES:
        s = (signed_max / -c).half()
        err = error(s)[0]
        if best_err is None:
            best_s, best_err = s, err
        else:
            best_s = torch.where(err < best_err, s, best_s)
            best_err = torch.minimum(err, best_err)
    q = _rounded(w, best_s, -8, 7)
    fitted = ((q * w).sum(dim=-1) / (q * q).sum(dim=-1).clamp_min(1)).half()
    err, q_fitted = error(fitted)
    better = err < best_err
    return torch.where(better, fitted, best_s), torch.where(better.unsqueeze(-1), q_fitted, q)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [rows, in32] (in [-8, 7], in32 a multiple of 32) -> uint8 [rows, in32 / 2]: per 64
    inputs, byte i holds input i + 8 in its low nibble and input i + 32 + 8 in its high one (a last
    group of 32: inputs i and i + 16), so the kernel unpacks a whole 64 with one mask and one shift."""
    rows, n32 = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    full = n32 // 64 * 64
    parts = []
    if full:
        chunks = u[:, :full].reshape(rows, -1, 2, 32)
        parts.append((chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(rows, -1))
    if n32 > full:
        tail = u[:, full:].reshape(rows, 2, 16)
        parts.append(tail[:, 0] | (tail[:, 1] << 4))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """pack4's inverse: uint8 [rows, in32 / 2] -> int8 values [rows, in32] in [-8, 7]."""
    rows, half = packed.shape
    n32 = 2 * half
    full = n32 // 64 * 64
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    parts = []
    if full:
        parts.append(torch.stack((low[:, :full // 2].reshape(rows, -1, 32), high[:, :full // 2].reshape(rows, -1, 32)),
                                 dim=2).reshape(rows, -1))
    if n32 > full:
        parts.append(torch.cat((low[:, full // 2:], high[:, full // 2:]), dim=1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, n_in: int) -> torch.Tensor:
    """QuantLinear's weights (or QuantizedRows') back to float32 [rows, n_in]: the reference."""
    values = q.float() if bits == 8 else unpack4(q).float()
    rows = values.shape[0]
    values = F.pad(values, (0, scale.shape[1] * GROUP - values.shape[1]))
    return (values.view(rows, -1, GROUP) * scale.float().unsqueeze(-1)).view(rows, -1)[:, :n_in]


def run_group(pairs) -> list[torch.Tensor]:
    """[(linear, x), ...] -> [linear(x), ...]; the kernel linears given a few rows share one
    parallel task, each row computed exactly as it would be alone.

    Linears the kernels cannot run (or inputs of more rows) are simply called."""
    words: list[int] = []
    outputs, keep = [], []
    kernels = None
    for linear, x in pairs:
        if not (isinstance(linear, (DenseLinear, QuantLinear)) and _kernel_rows(linear, x)):
            outputs.append(linear(x))
            continue
        job = linear._job
        if not x.is_contiguous():
            x = x.contiguous()
            keep.append(x)  # alive until the call returns
        rows = x.shape[0]
        y = torch.empty((rows, job[2]), dtype=linear.dtype)
        words += (job[0], job[1], x.data_ptr(), y.data_ptr(), job[2], job[3], job[4] | rows << 32, job[5])
        outputs.append(y)
        kernels = linear._kernels
    if words:
        kernels.gemv_words(array("q", words))
    return outputs


class StreamedLinear:
    """Weights kept in (pinned) host memory and copied to the compute device for every call."""

    def __init__(self, inner, device):
        self.inner = inner
        self.device = device
        for name in ("weight", "q", "scale"):
            tensor = getattr(inner, name, None)
            if tensor is not None and torch.cuda.is_available():
                setattr(inner, name, tensor.contiguous().pin_memory())
        self._on_cpu = torch.device(device).type == "cpu"
        self.copies = 0  # how many times weights crossed to the device (tests and stats read it)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.copies += 1
        return self.inner(x) if self._on_cpu else self.inner.on(self.device)(x)


def make_linear(weight: torch.Tensor, plan, device, scale: float = 1.0, layout: str = "rows"):
    """The linear layer a plan entry asks for. `scale` folds the fp16 rescale into the weight.

    layout="cols" marks a linear whose single-token input is mostly zeros (relu^2)."""
    if scale != 1.0:
        weight = weight.float() * scale
    home = "cpu" if plan.stream else device
    if plan.stream and torch.device(device).type != "cpu":
        layout = "rows"  # streamed to an accelerator: keep the plain layout
    if plan.quant:
        linear = QuantLinear(weight, plan.dtype, home, bits=plan.quant, blocks=not plan.stream, expand=plan.weights,
                             act8=plan.act8)
    else:
        linear = DenseLinear(weight, plan.dtype, home, layout=layout, weights=plan.weights)
    return StreamedLinear(linear, device) if plan.stream else linear
