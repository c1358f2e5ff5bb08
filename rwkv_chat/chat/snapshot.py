"""Saved conversations (`.rwkvchat`): one safetensors file per conversation.

The file's string metadata holds the conversation as JSON under the key "rwkv-chat-snapshot"
({"format": "rwkv-chat-snapshot", "format_version": 1, messages, settings, model identity,
state_file, tokens, ...}); the tensors are recurrent states, each stored as the flat dict of
`RWKVState.to_tensors()` under a name prefix:

    layer.{i}.{j}, logits                  the state after the whole conversation
    turn_start.layer.{i}.{j}, ...          the state before the last user message (optional)

Files are written atomically. Readers upgrade older `format_version`s step by step
(`_UPGRADES`) and refuse newer ones. This module knows nothing about sessions: it reads and
writes the JSON dict and named states; `ChatSession` gives them meaning.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..engine.state import VERSIONS, ModelShape, check_state_tensors
from ..errors import SnapshotError, StateMismatchError
from ..files import check_regular_file, write_atomically, write_new_file
from . import locations

FORMAT = "rwkv-chat-snapshot"
FORMAT_VERSION = 1
METADATA_KEY = "rwkv-chat-snapshot"
SUFFIX = ".rwkvchat"
MAIN_STATE = ""
TURN_START_STATE = "turn_start"
MAX_JSON_BYTES = 32 << 20
"""The largest description (JSON) a snapshot may carry."""
MAX_JSON_DEPTH = 16
"""The deepest nesting of lists and objects accepted in a snapshot's JSON."""
_MAX_SIZE = {"n_layer": 1 << 12, "n_embd": 1 << 17, "n_head": 1 << 17, "head_size": 1 << 17, "vocab_size": 1 << 24}


@dataclass
class SnapshotFile:
    """A snapshot as read from disk: its JSON (upgraded to the current format) and its states,
    each a flat `to_tensors()` dict, keyed by name ("" for the main state)."""

    path: Path
    data: dict
    states: dict[str, dict[str, torch.Tensor]]

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_dict(self.data["model"]["shape"])

    def require_shape(self, shape: ModelShape) -> None:
        """Raise StateMismatchError, naming both shapes, unless the snapshot was made with a
        model of `shape`."""
        if self.shape != shape:
            raise StateMismatchError(
                f"{self.path}: this conversation was saved with {self.shape.describe()} "
                f"({self.data['model'].get('name', 'unknown model')}); the loaded model is {shape.describe()}"
            )


@dataclass(frozen=True)
class SnapshotInfo:
    """What `list_snapshots` shows about a saved conversation without loading its states."""

    path: Path
    saved_at: datetime | None
    first_message: str
    model_name: str
    n_messages: int


def default_snapshot_path(folder: Path | None = None) -> Path:
    """A new timestamped file name in `folder` (default: the user's snapshots folder). Write it
    with `write_snapshot(..., new_file=True)`: another process may take the name meanwhile."""
    folder = Path(folder) if folder is not None else locations.snapshots_dir()
    stem = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, counter = folder / f"{stem}{SUFFIX}", 2
    while path.exists():
        path, counter = folder / f"{stem}-{counter}{SUFFIX}", counter + 1
    return path


def write_snapshot(path: str | os.PathLike, data: dict, states: dict[str, dict[str, torch.Tensor]],
                   *, new_file: bool = False) -> Path:
    """Write `data` (JSON-safe; format fields and saved_at are added) and the named states,
    atomically. `new_file`: never replace an existing file; a taken name gets "-2", "-3", ...
    (the path written is returned). Any failure is a SnapshotError naming the file; the file
    that was there before stays intact."""
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "saved_at": datetime.now().astimezone().isoformat(),
                **data}
    metadata = {METADATA_KEY: json.dumps(document, ensure_ascii=False)}
    tensors = {
        _tensor_name(name, key): tensor.detach().cpu().contiguous().clone()
        for name, state in states.items()
        for key, tensor in state.items()
    }
    write = write_new_file if new_file else write_atomically
    try:
        return write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    except (OSError, SafetensorError) as error:  # SafetensorError: a failed write safetensors reports itself
        raise SnapshotError(f"{path}: cannot save the conversation ({_write_problem(error)})") from error


def _write_problem(error: Exception) -> str:
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "the disk is full"
    if getattr(error, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM) or "os error 30" in text:
        return f"the folder cannot be written: {getattr(error, 'reason', None) or getattr(error, 'strerror', None) or text}"
    return text


def read_snapshot(path: str | os.PathLike) -> SnapshotFile:
    """Read a whole snapshot; SnapshotError (naming the file) when it is missing or damaged."""
    path = Path(path)
    data = read_snapshot_data(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise SnapshotError(f"{path}: the saved states are damaged ({str(error)[:200]})") from error
    states = _split_states(tensors)
    _check_states(path, data, states)
    return SnapshotFile(path, data, states)


def _check_states(path: Path, data: dict, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """The states the JSON promises, no others, each a valid state of the snapshot's model shape."""
    wanted = {MAIN_STATE} | ({TURN_START_STATE} if data.get("last_turn") is not None else set())
    unexpected = sorted(set(states) - wanted)
    if unexpected:
        raise SnapshotError(f"{path}: unexpected saved state(s) {unexpected[:3]}")
    shape = ModelShape.from_dict(data["model"]["shape"])
    for name in sorted(wanted):
        label = "the main state" if name == MAIN_STATE else f"the {name!r} state"
        if name not in states:
            raise SnapshotError(f"{path}: {label} is missing")
        try:
            check_state_tensors(shape, states[name])
        except StateMismatchError as error:
            raise SnapshotError(f"{path}: {label} is damaged ({error})") from None


def read_snapshot_data(path: str | os.PathLike) -> dict:
    """Only the JSON part of a snapshot (cheap: the tensors are not read), upgraded to the
    current format."""
    path = Path(path)
    check_regular_file(path, "snapshot file", SnapshotError)  # a FIFO would block in open()
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise SnapshotError(f"{path}: not a readable rwkv-chat snapshot ({error})") from error
    if METADATA_KEY not in metadata:
        raise SnapshotError(f"{path}: not an rwkv-chat snapshot (no {METADATA_KEY!r} metadata)")
    return _upgrade(path, parse_description(path, metadata[METADATA_KEY]))


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What a snapshot holds, for `rwkv-chat info` (only the JSON part is read): file, kind,
    date, model, shape, messages, ...; `size` in bytes."""
    path = Path(path)
    data = read_snapshot_data(path)
    model, messages = data["model"], data["messages"]
    first = next((m.get("text", "") for m in messages if m.get("role") == "user"), "")
    return {
        "file": str(path),
        "kind": "saved conversation (snapshot)",
        "saved at": str(data.get("saved_at", "?"))[:19].replace("T", " "),
        "model": f"{model.get('name', '?')} ({model.get('path', '?')})",
        "shape": ModelShape.from_dict(model["shape"]).describe(),
        "fingerprint": model.get("fingerprint", "?"),
        "state file": data.get("state_file") or "-",
        "messages": len(messages),
        "first message": " ".join(first.split())[:80] or "-",
        "tokens": data["tokens"],
        "size": path.stat().st_size,
    }


def parse_description(path: Path, text: str):
    """The snapshot's JSON, refusing what json.loads would accept but we never write: more than
    MAX_JSON_BYTES, nesting deeper than MAX_JSON_DEPTH, NaN / Infinity constants."""
    if len(text) > MAX_JSON_BYTES:
        raise SnapshotError(f"{path}: the snapshot's description is {len(text)} bytes; the limit is {MAX_JSON_BYTES}")

    def refuse_constant(name):
        raise ValueError(f"{name} is not allowed")

    try:
        data = json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise SnapshotError(f"{path}: the snapshot's description is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, our constants, integers of thousands of digits
        raise SnapshotError(f"{path}: the snapshot's description is damaged ({str(error)[:200]})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise SnapshotError(f"{path}: the snapshot's description is nested deeper than {MAX_JSON_DEPTH} levels")
    where = _unencodable_text(data)
    if where is not None:  # JSON's \ud800 escapes decode to lone surrogates, which no file or screen takes
        raise SnapshotError(f"{path}: the snapshot's description has text that is not valid Unicode "
                            f"(a lone surrogate) at {where or 'its top level'}")
    return data


def _unencodable_text(value, where: str = "") -> str | None:
    """Where in a parsed JSON value a string (or key) cannot be encoded as UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable_text(key, where) if isinstance(key, str) else None
            found = found if found is not None else _unencodable_text(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable_text(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def _depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of lists and objects ({"a": 1} is 1), counted no further than limit + 1."""
    level, current = 0, [value]
    while level <= limit:
        containers = [v for v in current if isinstance(v, (list, dict))]
        if not containers:
            break
        level += 1
        current = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return level


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a valid value")


def _tensor_name(state_name: str, key: str) -> str:
    return f"{state_name}.{key}" if state_name else key


def _split_states(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        prefix, _, key = name.partition(".")
        if prefix in ("layer", "logits"):
            states.setdefault(MAIN_STATE, {})[name] = tensor
        else:
            states.setdefault(prefix, {})[key] = tensor
    return states


# ------------------------------------------------------------------ versions
_REQUIRED_V1 = {"messages": list, "settings": dict, "model": dict, "tokens": int}

# format_version N -> function turning an N document into an N+1 document.
_UPGRADES: dict[int, Callable[[dict], dict]] = {}


def _upgrade(path: Path, data) -> dict:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not an rwkv-chat snapshot (format is not {FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SnapshotError(f"{path}: the snapshot has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: saved by a newer rwkv-chat (snapshot format {version}; this version reads up to {FORMAT_VERSION})"
        )
    while version < FORMAT_VERSION:
        data = _UPGRADES[version](data)
        version = data["format_version"]
    _check_fields(path, data)
    return data


def _check_fields(path: Path, data: dict) -> None:
    """Every field of a current-format document: types, values, and that they agree."""
    def fail(message: str) -> SnapshotError:
        return SnapshotError(f"{path}: the snapshot's {message}")

    for name, kind in _REQUIRED_V1.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise fail(f"{name!r} entry is missing or not a {kind.__name__}")
    model = data["model"]
    if not isinstance(model.get("shape"), dict):
        raise SnapshotError(f"{path}: the snapshot does not say which model shape it was made with")
    _check_shape(model["shape"], fail)
    for key in ("name", "path", "version", "fingerprint"):
        if key in model and not isinstance(model[key], str):
            raise fail(f"model {key} is not a string")
    if data["tokens"] < 0:
        raise fail(f"token count {data['tokens']} is negative")
    for i, message in enumerate(data["messages"]):
        if not isinstance(message, dict):
            raise fail(f"message {i} is a {_kind(message)}, not an object")
        if message.get("role") not in ("user", "assistant") or not isinstance(message.get("text"), str):
            raise fail(f"message {i} needs a role of \"user\" or \"assistant\" and a string text")
        if message.get("stats") is not None and not _is_stats(message["stats"]):
            raise fail(f"message {i} has damaged stats")
        if not isinstance(message.get("finish_reason"), (str, type(None))):
            raise fail(f"message {i} finish_reason is not a string")
    for key, kinds in (("saved_at", str), ("state_file", str), ("needs_turn_end", bool), ("chat", dict),
                       ("last_turn", dict)):
        if data.get(key) is not None and not isinstance(data[key], kinds):
            raise fail(f"{key!r} entry is a {_kind(data[key])}, not a {kinds.__name__}")
    if "\0" in (data.get("state_file") or ""):
        raise fail("state_file path contains a NUL character")
    for key, value in (data.get("chat") or {}).items():
        if key not in ("user", "assistant", "preamble") or not isinstance(value, str):
            raise fail(f"chat entry {key!r} is unknown or not a string")
    turn = data.get("last_turn")
    if turn is not None:
        for key, kind in (("prompt", str), ("raw_reply", str), ("tokens_before", int)):
            if not isinstance(turn.get(key), kind) or isinstance(turn.get(key), bool):
                raise fail(f"last_turn {key!r} is missing or not a {kind.__name__}")
        if not isinstance(turn.get("ended_by_stop", False), bool):
            raise fail("last_turn 'ended_by_stop' is not true or false")
        if not 0 <= turn["tokens_before"] <= data["tokens"]:
            raise fail(f"last_turn starts at token {turn['tokens_before']}, outside 0..{data['tokens']}")


def _check_shape(shape: dict, fail) -> None:
    """Strict: exactly the ModelShape fields, a known version, positive integers that agree."""
    fields = {"version", *_MAX_SIZE}
    if set(shape) != fields:
        raise fail(f"model shape has fields {sorted(map(str, shape))[:8]}, expected {sorted(fields)}")
    if shape["version"] not in VERSIONS:
        raise fail(f"model shape has version {str(shape['version'])[:20]!r}, not one of {', '.join(VERSIONS)}")
    for key, limit in _MAX_SIZE.items():
        value = shape[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise fail(f"model shape {key} is {str(value)[:20]!r}, not an integer from 1 to {limit}")
    if shape["n_head"] * shape["head_size"] != shape["n_embd"]:
        raise fail(f"model shape has {shape['n_head']} heads of {shape['head_size']}, not n_embd {shape['n_embd']}")


def _is_stats(stats) -> bool:
    return isinstance(stats, dict) and all(
        isinstance(value, (int, float, type(None))) and not isinstance(value, bool) for value in stats.values()
    )


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


# ------------------------------------------------------------------ listing
def list_snapshots(folder: str | os.PathLike | None = None) -> list[SnapshotInfo]:
    """Saved conversations in `folder` (default: the user's snapshots folder), newest first.
    Files that cannot be read as snapshots are left out (`scan_snapshots` lists them too)."""
    return scan_snapshots(folder)[0]


def scan_snapshots(folder: str | os.PathLike | None = None) -> tuple[list[SnapshotInfo], list[tuple[Path, str]]]:
    """(readable snapshots newest first, [(path, why it cannot be read)]) in `folder`."""
    folder = Path(folder) if folder is not None else locations.snapshots_dir()
    try:
        paths = sorted(folder.glob(f"*{SUFFIX}"))
    except OSError:
        return [], []
    infos, unreadable = [], []
    for path in paths:
        try:
            infos.append(_info(path, read_snapshot_data(path)))
        except SnapshotError as error:
            unreadable.append((path, str(error).removeprefix(f"{path}: ")))
        except (OSError, ValueError, TypeError, RecursionError) as error:
            unreadable.append((path, str(error) or type(error).__name__))
    infos.sort(key=lambda info: (info.saved_at.timestamp() if info.saved_at else 0.0, info.path.name), reverse=True)
    return infos, unreadable


def _info(path: Path, data: dict) -> SnapshotInfo:
    messages = data["messages"]
    first_user = str(next((m.get("text", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"), ""))
    return SnapshotInfo(
        path=path,
        saved_at=_parse_time(data.get("saved_at")),
        first_message=first_user,
        model_name=str(data["model"].get("name", "")),
        n_messages=len(messages),
    )


def _parse_time(text) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
