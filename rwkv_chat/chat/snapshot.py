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

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..engine.state import ModelShape
from ..errors import SnapshotError, StateMismatchError
from ..files import check_regular_file
from . import locations

FORMAT = "rwkv-chat-snapshot"
FORMAT_VERSION = 1
METADATA_KEY = "rwkv-chat-snapshot"
SUFFIX = ".rwkvchat"
MAIN_STATE = ""
TURN_START_STATE = "turn_start"


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
    write = locations.write_new_file if new_file else locations.write_atomically
    try:
        return write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    except Exception as error:  # OSError, or safetensors' own error for a failed write
        raise SnapshotError(f"{path}: cannot save the conversation ({_write_problem(error)})") from error


def _write_problem(error: Exception) -> str:
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "the disk is full"
    if getattr(error, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM) or "os error 30" in text:
        return f"the folder cannot be written: {error.strerror if isinstance(error, OSError) else text}"
    return text


def read_snapshot(path: str | os.PathLike) -> SnapshotFile:
    """Read a whole snapshot; SnapshotError (naming the file) when it is missing or damaged."""
    path = Path(path)
    data = read_snapshot_data(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise SnapshotError(f"{path}: the saved states are damaged ({error})") from error
    return SnapshotFile(path, data, _split_states(tensors))


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
    try:
        data = json.loads(metadata[METADATA_KEY], parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        problem = "nested too deeply" if isinstance(error, RecursionError) else error
        raise SnapshotError(f"{path}: the snapshot's description is damaged ({problem})") from error
    return _upgrade(path, data)


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
    if not isinstance(version, int) or version < 1:
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
    for name, kind in _REQUIRED_V1.items():
        if not isinstance(data.get(name), kind):
            raise SnapshotError(f"{path}: the snapshot's {name!r} entry is missing or not a {kind.__name__}")
    if not isinstance(data["model"].get("shape"), dict):
        raise SnapshotError(f"{path}: the snapshot does not say which model shape it was made with")
    try:
        ModelShape.from_dict(data["model"]["shape"])
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise SnapshotError(f"{path}: the snapshot's model shape is damaged ({error})") from error


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
