"""Reading checkpoints safely: find the file, load without executing code, detect the version,
and check every key and shape before any weight is prepared."""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, ModelPathError, NotARegularFileError
from ..files import check_regular_file, load_tensors, regular_file_problem
from . import v4, v5_2, v6, v7
from .state import ModelShape

VERSION_MODULES = {"4": v4, "5.2": v5_2, "6": v6, "7": v7}
_BLOCK_KEY = re.compile(r"blocks\.([0-9]+)\.(.+)", re.DOTALL)
TIME_STATE = "att.time_state"
_TIME_STATE_KEY = re.compile(r"blocks\.([0-9]+)\.att\.time_state")
_MAX_AXES = 4  # the most any RWKV weight has ([1, 1, C] mixes, v6 [5, C, D] LoRA)
MAX_LAYERS = 1 << 12
"""The highest block number a file may hold (real models have at most a few hundred layers)."""
READABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""The tensor dtypes rwkv-chat reads from checkpoints and state files."""
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # the older torch.save format: a pickle, then the raw storages


@dataclass(frozen=True)
class Dims(ModelShape):
    """The checkpoint's ModelShape plus the hidden sizes only loading needs."""

    ffn_dim: int = 0
    maa_dim: int = 0  # v6 ddlerp LoRA rank
    decay_dim: int = 0  # v6 decay LoRA rank
    w_dim: int = 0  # v7 LoRA ranks
    a_dim: int = 0
    v_dim: int = 0
    g_dim: int = 0

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.version, self.n_layer, self.n_embd, self.n_head, self.head_size, self.vocab_size)


def path_text(path, what: str = "checkpoint") -> str:
    """`path` (a str, bytes or os.PathLike) as a str; ModelPathError for anything else (None, a number)."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise ModelPathError(f"the {what} must be given as a file path (a str or os.PathLike), "
                             f"got {_short(path)} ({type(path).__name__})") from None


def resolve_path(path: str | os.PathLike) -> Path:
    """The checkpoint file, accepting a path with or without the .pth suffix."""
    p = Path(os.path.expanduser(path_text(path).strip()))
    problem = regular_file_problem(p)  # never opens: a FIFO cannot block
    if problem is None:
        return p
    with_suffix = p.with_name(p.name + ".pth") if p.name else p
    missing = problem.endswith("no such file")
    if p.name and p.suffix != ".pth" and (missing or problem.endswith("is a directory, not a regular file")):
        other = regular_file_problem(with_suffix)
        if other is None:
            return with_suffix
        if missing and not other.endswith("no such file"):
            problem = other  # model.pth exists but is a FIFO, a folder, ...
        elif missing and p.name:
            problem += f" (nor {with_suffix.name})"
    if problem.endswith("is a directory, not a regular file"):
        raise NotARegularFileError(problem.replace("not a regular file", "not a checkpoint file (.pth)"))
    if problem.endswith("not a regular file"):
        raise NotARegularFileError(problem)
    raise ModelLoadError(problem)


def read_tensors(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """torch.load with weights_only (no code runs), memory-mapped when the format allows; then
    every entry checked: string keys, dense (strided) tensors with at most 4 axes."""
    check_regular_file(path, f"{what} file")  # a FIFO would block in open()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 5": our error says it better
            data = load_tensors(path)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(f"{path}: not a tensors-only {what}" + _unpickle_detail(error)) from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: is a directory, not a {what} file") from None
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such {what} file") from None
    except Exception as error:  # torch raises many types for corrupt or foreign files
        if "weights only load failed" in str(error).lower():  # never show torch's advice to load unsafely
            raise ModelLoadError(f"{path}: not a tensors-only {what}" + _unpickle_detail(error)) from None
        raise ModelLoadError(f"{path}: not a readable PyTorch {what} ({_unreadable_reason(path, error)})") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    if "_strategy" in data:
        raise ModelLoadError(
            f"{path}: was pre-converted by ChatRWKV for strategy {str(data['_strategy'])[:80]!r}; "
            "load the original .pth instead (rwkv-chat converts at load time)"
        )
    for key, value in data.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"{path}: has a key {_short(key)} of type {type(key).__name__}; keys must be names")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{path}: entry {_short(key)} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise ModelLoadError(f"{path}: entry {_short(key)} is a {value.layout} tensor; only dense tensors are supported")
        if value.dim() > _MAX_AXES:
            raise ModelLoadError(f"{path}: entry {_short(key)} has {value.dim()} axes (shape {list(value.shape)[:8]})")
        problem = _layer_number_problem(key) or _tensor_problem(value)
        if problem:
            raise ModelLoadError(f"{path}: entry {_short(key)} {problem}")
    return dict(data)


def _layer_number_problem(key: str) -> str | None:
    match = _BLOCK_KEY.fullmatch(key)
    if match and (len(match[1]) > len(str(MAX_LAYERS)) or int(match[1]) >= MAX_LAYERS):
        number = match[1] if len(match[1]) <= 24 else match[1][:21] + "..."
        return f"names layer {number}; rwkv-chat reads models of at most {MAX_LAYERS} layers"
    return None


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    """What makes `tensor` unusable whatever it is for, found from its metadata alone (no
    element is read). Its dtype is checked where it is used (`dtype_problem`)."""
    if tensor.is_meta:  # map_location="cpu" moves every other device's tensors to the CPU
        return "is a meta tensor: the file holds its shape but no data"
    return _storage_problem(tensor)


def dtype_problem(tensor: torch.Tensor) -> str | None:
    """Why rwkv-chat cannot compute with `tensor`'s dtype (float8, an integer type, ...), or None."""
    if tensor.dtype in READABLE_DTYPES:
        return None
    names = ", ".join(str(dtype).removeprefix("torch.") for dtype in READABLE_DTYPES)
    return f"is {str(tensor.dtype).removeprefix('torch.')}, which rwkv-chat cannot use (it reads {names})"


def _storage_problem(tensor: torch.Tensor) -> str | None:
    """Whether the shape and strides address distinct elements, all inside the saved data. A
    checkpoint entry is never an expanded or overlapping view; one claiming 2^40 elements over
    a single stored value would otherwise be scanned (or copied) element by element."""
    stored = tensor.untyped_storage().nbytes() // tensor.element_size()
    if tensor.numel() > stored:
        return f"claims {tensor.numel():,} elements (shape {list(tensor.shape)}) but its data holds {stored:,}"
    if tensor.numel() == 0:
        return None
    reach = 0  # the furthest element the axes so far address, counted from the first
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride <= reach:
            return (f"has overlapping strides {list(tensor.stride())} for shape {list(tensor.shape)} "
                    "(an expanded or as_strided view, never a saved weight)")
        reach += (size - 1) * stride
    if tensor.storage_offset() + reach >= stored:
        return f"reaches past the end of its data (shape {list(tensor.shape)}, strides {list(tensor.stride())})"
    return None


def _short(key) -> str:
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _unreadable_reason(path: Path, error: Exception) -> str:
    """Why torch could not read `path`, in plain words, told from the file's first bytes."""
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EIO):
        return error.strerror or str(error)
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError as open_error:
        return open_error.strerror or str(open_error)
    detail = "" if isinstance(error, OSError) else _first_sentence(str(error).strip("'\""))
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC):
        reason = "a zip archive that is damaged, cut short or not written by torch.save"
        return reason + (f": {detail}" if detail else "")
    if head.startswith(_LEGACY_MAGIC):
        return "a damaged or cut-short file in PyTorch's older format"
    if len(head) == 9 and head[8:9] == b"{":
        return "a damaged or cut-short safetensors file" + (f": {detail}" if detail else "")
    return "neither a zip archive, as torch.save writes, nor a safetensors file"


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of a library's message, whole, without its class prefix; '' if too long."""
    sentence = text.strip().split(". ")[0].splitlines()[0] if text.strip() else ""
    sentence = re.sub(r"^PytorchStreamReader (failed reading zip archive: )?", "", sentence).rstrip(".")
    return sentence if len(sentence) <= limit else ""


def _unpickle_detail(error: Exception) -> str:
    """Why a weights-only load stopped, in our words (never torch's advice to load unsafely)."""
    text = str(error)
    if match := re.search(r"GLOBAL\s+([\w.]+)", text):
        return f"; rwkv-chat refuses to unpickle code (the file asks for {match[1]})"
    if "global" in text.lower() or "class" in text.lower():
        return "; rwkv-chat refuses to unpickle code"
    if match := re.search(r"Unsupported operand (\d+)", text):
        return f" (damaged or foreign data: pickle opcode {match[1]} is not allowed in a tensors-only load)"
    first = text.strip().splitlines()[0][:120] if text.strip() else type(error).__name__
    return f" (damaged or foreign data: {first})" if "weights only" not in first.lower() else ""


def split_blocks(sd: dict[str, torch.Tensor]) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    other = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            blocks.setdefault(int(m[1]), {})[m[2]] = value
        else:
            other[key] = value
    return blocks, other


def detect_version(sd: dict[str, torch.Tensor], path: Path) -> str:
    """From the key names alone (exact suffixes; a loose substring match misdetects)."""
    blocks, other = split_blocks(sd)
    if not blocks or "emb.weight" not in other:
        if blocks and all(set(b) == {TIME_STATE} for b in blocks.values()):
            raise ModelLoadError(f"{path}: is a tuned state file, not a model; pass it with --state / load_state()")
        raise ModelLoadError(f"{path}: not an RWKV checkpoint (no 'emb.weight' / 'blocks.N.*' keys)")
    first = blocks.get(0, {})
    if "att.r_k" in first:
        return "7"
    if "att.time_maa_x" in first:
        return "6"
    if "att.ln_x.weight" in first:
        decay = first.get("att.time_decay")
        if decay is not None and decay.dim() == 2 and decay.shape[1] > 1 and "att.gate.weight" in first:
            return "5.2"
        raise ModelLoadError(
            f"{path}: is an RWKV-5.0/5.1 checkpoint (pre-world); only v4, v5.2, v6 and v7 world models are supported"
        )
    if "att.time_first" in first and "att.time_decay" in first:
        return "4"
    raise ModelLoadError(f"{path}: unknown RWKV layout (block 0 has {sorted(first)[:6]}...)")


def _shape(sd, key, path, axes: int = 0) -> tuple[int, ...]:
    """The shape of sd[key], which must have at least `axes` axes."""
    if key not in sd:
        raise ModelLoadError(f"{path}: missing key {key!r}")
    shape = tuple(sd[key].shape)
    if len(shape) < axes:
        raise ModelLoadError(f"{path}: {key!r} has shape {list(shape)}, expected at least {axes} axes")
    return shape


def read_dims(sd: dict[str, torch.Tensor], version: str, path: Path) -> Dims:
    blocks, _ = split_blocks(sd)
    indices = sorted(blocks)
    if indices != list(range(len(indices))):
        missing = list(itertools.islice((i for i in range(indices[-1]) if i not in blocks), 6))
        listed = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{path}: layers [{listed}] are missing (found blocks up to {indices[-1]})")
    emb = _shape(sd, "emb.weight", path)
    if len(emb) != 2:
        raise ModelLoadError(f"{path}: 'emb.weight' has shape {list(emb)}, expected [vocab, n_embd]")
    vocab, C = emb
    ffn_dim = _shape(sd, "blocks.0.ffn.key.weight", path, 1)[0]
    extra = {}
    if version == "4":
        n_head, head_size = 1, C
    elif version == "5.2":
        n_head, head_size = _shape(sd, "blocks.0.att.time_decay", path, 2)[:2]
    elif version == "6":
        n_head, head_size = _shape(sd, "blocks.0.att.time_faaaa", path, 2)[:2]
        extra["maa_dim"] = _shape(sd, "blocks.0.att.time_maa_w1", path, 1)[-1] // 5
        extra["decay_dim"] = _shape(sd, "blocks.0.att.time_decay_w1", path, 1)[-1]
    else:
        n_head, head_size = _shape(sd, "blocks.0.att.r_k", path, 2)[:2]
        for name in "wag":
            extra[f"{name}_dim"] = _shape(sd, f"blocks.0.att.{name}1", path, 1)[-1]
        v1 = "blocks.1.att.v1" if len(indices) > 1 else "blocks.0.att.v1"
        extra["v_dim"] = _shape(sd, v1, path, 1)[-1] if v1 in sd else 0
    if n_head * head_size != C:
        raise ModelLoadError(f"{path}: {n_head} heads x {head_size} != n_embd {C}")
    sizes = {"vocabulary": vocab, "n_embd": C, "heads": n_head, "head size": head_size, "ffn size": ffn_dim,
             **{name: value for name, value in extra.items() if name != "v_dim" or len(indices) > 1}}
    empty = [name for name, value in sizes.items() if value < 1]
    if empty:
        raise ModelLoadError(f"{path}: zero-sized model ({', '.join(empty)} of 0)")
    return Dims(version, len(indices), C, n_head, head_size, vocab, ffn_dim=ffn_dim, **extra)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def validate(sd: dict[str, torch.Tensor], version: str, dims: Dims, path: Path) -> dict[str, torch.Tensor]:
    """Every key the version needs, with its shape (size-1 axes ignored, as files differ there).
    Returns those entries, each in the listed shape; other entries are left out, never read."""
    C, V = dims.n_embd, dims.vocab_size
    expected = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
                "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    module = VERSION_MODULES[version]
    per_layer = module.layer_shapes(dims) | {f"ln{i}.{p}": (C,) for i in (1, 2) for p in ("weight", "bias")}
    for layer in range(dims.n_layer):
        optional = module.optional_in_layer(layer)
        for suffix, shape in per_layer.items():
            if suffix in optional and f"blocks.{layer}.{suffix}" not in sd:
                continue
            expected[f"blocks.{layer}.{suffix}"] = shape
    weights = {}
    for key, shape in expected.items():
        actual = _shape(sd, key, path)
        if _squeezed(actual) != _squeezed(shape):
            raise ModelLoadError(f"{path}: {key!r} has shape {list(actual)}, expected {list(shape)}")
        problem = dtype_problem(sd[key])
        if problem:
            raise ModelLoadError(f"{path}: {key!r} {problem}")
        # files differ in size-1 axes: from here on every weight has the listed shape
        weights[key] = sd[key] if actual == shape else sd[key].reshape(shape)
    return weights


def check_finite(key: str, tensor: torch.Tensor, path: Path, chunk: int = 1 << 22) -> None:
    flat = tensor.reshape(-1)
    if not all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
        raise ModelLoadError(f"{path}: {key!r} contains NaN or infinite values")


def time_state_layers(sd: dict[str, torch.Tensor], path: Path, *, state_file: bool) -> list[torch.Tensor] | None:
    """The one home of the tuned-state rule: the `blocks.N.att.time_state` tensors in layer order,
    checked to be numbered 0..n-1 and floating-point [H, N, N] of one shape. None when there are
    none (a checkpoint without a merged state). state_file=True: `sd` is a tuned state file, so
    it must hold these entries and nothing else."""
    found: dict[int, torch.Tensor] = {}
    for key, value in sd.items():
        m = _TIME_STATE_KEY.fullmatch(key)
        if m:
            found[int(m[1])] = value
        elif state_file:
            raise ModelLoadError(f"{path}: not a tuned state file (unexpected entry {_short(key)}; "
                                 "expects only blocks.N.att.time_state entries)")
    if not found:
        if state_file:
            raise ModelLoadError(f"{path}: not a tuned state file (no blocks.N.att.time_state entries)")
        return None
    order = sorted(found)
    if order != list(range(len(order))):
        raise ModelLoadError(f"{path}: time_state layers {order[:6]} are not numbered 0..{len(order) - 1}")
    layers = [found[i] for i in order]
    first = tuple(layers[0].shape)
    if len(first) != 3 or first[1] != first[2] or 0 in first:
        raise ModelLoadError(f"{path}: blocks.0.att.time_state has shape {list(first)}, expected [heads, N, N]")
    for i, tensor in enumerate(layers):
        if tuple(tensor.shape) != first:
            raise ModelLoadError(f"{path}: blocks.{i}.att.time_state has shape {list(tensor.shape)}, "
                                 f"blocks.0 has {list(first)}")
        problem = dtype_problem(tensor)
        if problem:
            raise ModelLoadError(f"{path}: blocks.{i}.att.time_state {problem}")
    return layers


def read_state_file(path: Path) -> list[torch.Tensor]:
    """A tuned state file's [H, N, N] layers in order (read without running code, validated by
    `time_state_layers`); not yet checked against any model."""
    check_regular_file(path, "state file")  # a FIFO would block in open()
    return time_state_layers(read_tensors(path, "state file"), path, state_file=True)


def time_state_tensors(sd: dict[str, torch.Tensor], dims: Dims, path: Path, version: str) -> list[torch.Tensor] | None:
    """The tuned-state entries of a state file or of a checkpoint with a merged state, checked
    against the model's dims, finite, as float32."""
    layers = time_state_layers(sd, path, state_file=False)
    return None if layers is None else fit_time_state(layers, dims, path, version)


def fit_time_state(layers: list[torch.Tensor], dims: Dims, path: Path, version: str) -> list[torch.Tensor]:
    """Tuned-state layers (from `time_state_layers`) checked against a model's dims, finite, as float32."""
    if version == "4":
        raise ModelLoadError(f"{path}: tuned states exist for v5.2, v6 and v7 only; this model is v4")
    H, N = dims.n_head, dims.head_size
    if len(layers) != dims.n_layer:
        raise ModelLoadError(f"{path}: has time_state for {len(layers)} layer(s), the model has {dims.n_layer} layers")
    shape = tuple(layers[0].shape)
    if shape != (H, N, N):
        raise ModelLoadError(f"{path}: time_state is [{shape[0]} heads x {shape[1]}], the model has {H} heads of {N} "
                             f"(needs [{H}, {N}, {N}])")
    for i, t in enumerate(layers):
        check_finite(f"blocks.{i}.att.time_state", t, path)
    return [t.float() for t in layers]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint or tuned state file holds, read without building a model (memory-mapped,
    weights-only): file, kind, layers, width, heads, ... in display order. `parameters` (a count)
    and `size` (bytes) are numbers; the caller formats them."""
    path = resolve_path(path)
    sd = read_tensors(path)  # mmap, weights_only: no code runs, nothing is copied
    blocks, other = split_blocks(sd)
    common = {"parameters": sum(t.numel() for t in sd.values()), "dtype": _dtypes(sd), "size": path.stat().st_size}
    if blocks and not other and all(set(b) == {TIME_STATE} for b in blocks.values()):
        layers = time_state_layers(sd, path, state_file=True)
        n_head, head_size, _ = layers[0].shape
        return {"file": str(path), "kind": "tuned state file", "layers": len(layers), "width": n_head * head_size,
                "heads": f"{n_head} x {head_size}",
                "fits": f"RWKV v5.2/v6/v7 models of {len(layers)} layers x {n_head * head_size}", **common}
    version = detect_version(sd, path)
    dims = read_dims(sd, version, path)
    validate(sd, version, dims, path)  # what loading would refuse (bar NaN values, which take a scan)
    merged = time_state_layers(sd, path, state_file=False) is not None
    return {
        "file": str(path),
        "kind": "RWKV model" + (" (with a merged tuned state)" if merged else ""),
        "version": version,
        "layers": dims.n_layer,
        "width": dims.n_embd,
        "heads": f"{dims.n_head} x {dims.head_size}" if version != "4" else "- (v4 has no heads)",
        "ffn": dims.ffn_dim,
        "vocab": dims.vocab_size,
        **common,
    }


def _dtypes(sd: dict[str, torch.Tensor]) -> str:
    """The dtypes of the entries, most elements first ("bfloat16, float32")."""
    counts: dict[str, int] = {}
    for tensor in sd.values():
        name = str(tensor.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + tensor.numel()
    return ", ".join(sorted(counts, key=counts.get, reverse=True))


def fingerprint(path: Path) -> str:
    """A quick content fingerprint: size plus sampled chunks (whole-file hashing of GBs is too slow)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    chunk = 1 << 20
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            f.seek(offset)
            digest.update(f.read(chunk))
    return digest.hexdigest()[:16]

