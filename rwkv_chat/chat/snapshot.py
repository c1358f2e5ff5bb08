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
    """A new timestamped file name in `folder` (default: the user's snapshots folder)."""
    folder = Path(folder) if folder is not None else locations.snapshots_dir()
    stem = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, counter = folder / f"{stem}{SUFFIX}", 2
    while path.exists():
        path, counter = folder / f"{stem}-{counter}{SUFFIX}", counter + 1
    return path


def write_snapshot(path: str | os.PathLike, data: dict, states: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write `data` (JSON-safe; format fields and saved_at are added) and the named states."""
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "saved_at": datetime.now().astimezone().isoformat(),
                **data}
    metadata = {METADATA_KEY: json.dumps(document, ensure_ascii=False)}
    tensors = {
        _tensor_name(name, key): tensor.detach().cpu().contiguous().clone()
        for name, state in states.items()
        for key, tensor in state.items()
    }
    try:
        return locations.write_atomically(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    except OSError as error:
        raise SnapshotError(f"{path}: cannot save the conversation ({getattr(error, 'reason', error)})") from error


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
        data = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise SnapshotError(f"{path}: the snapshot's description is damaged ({error})") from error
    return _upgrade(path, data)


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
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(f"{path}: the snapshot's model shape is damaged ({error})") from error


# ------------------------------------------------------------------ listing
def list_snapshots(folder: str | os.PathLike | None = None) -> list[SnapshotInfo]:
    """Saved conversations in `folder` (default: the user's snapshots folder), newest first.
    Files that cannot be read as snapshots are left out."""
    folder = Path(folder) if folder is not None else locations.snapshots_dir()
    if not folder.is_dir():
        return []
    infos = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            infos.append(_info(path, read_snapshot_data(path)))
        except SnapshotError:
            continue
    return sorted(infos, key=lambda info: (info.saved_at.timestamp() if info.saved_at else 0.0, info.path.name),
                  reverse=True)


def _info(path: Path, data: dict) -> SnapshotInfo:
    messages = data["messages"]
    first_user = next((m.get("text", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"), "")
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
