"""Tuned state files (RWKV-PEFT "state tuning"): find them, describe them, write them.

A state file is a `.pth` dict holding exactly `blocks.{i}.att.time_state`, one [H, N, N] tensor
per layer, stored [h][v][k]. Listing reads only the tensor shapes (a memory-mapped,
weights-only load), so a folder of large files lists quickly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import loader
from ..engine.state import ModelShape, RWKVState
from ..errors import ModelLoadError
from ..files import write_atomically
from . import locations

STATE_FILE_SUFFIX = ".pth"


@dataclass(frozen=True)
class StateFileInfo:
    """What a state file is for. `problem` is set (and the numbers are 0) when the file could
    not be read as a state file."""

    path: Path
    n_layer: int = 0
    n_head: int = 0
    head_size: int = 0
    dtype: str = ""
    source: str = "user"
    problem: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_size

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        heads = f"{self.n_head} heads of {self.head_size}"
        return f"{self.name}: {self.n_layer} layers x {self.n_embd} ({heads}), {self.dtype}"

    def fits(self, shape: ModelShape) -> tuple[bool, str]:
        """(True, "") when a model of `shape` can start from this state, else (False, why)."""
        if self.problem:
            return False, self.problem
        if shape.version == "4":
            return False, "RWKV v4 models have no matrix state, so they cannot use tuned state files"
        mismatches = [
            f"{what} {mine} (the model has {theirs})"
            for what, mine, theirs in (
                ("layers", self.n_layer, shape.n_layer),
                ("width", self.n_embd, shape.n_embd),
                ("head size", self.head_size, shape.head_size),
            )
            if mine != theirs
        ]
        if mismatches:
            return False, f"{self.name} is for another model size: " + ", ".join(mismatches)
        return True, ""


def read_state_file_info(path: str | os.PathLike, source: str = "user") -> StateFileInfo:
    """Describe one state file; raise ModelLoadError when it is not a readable state file."""
    file = Path(path)
    layers = loader.read_state_file(file)
    n_head, head_size, _ = layers[0].shape
    return StateFileInfo(file, n_layer=len(layers), n_head=n_head, head_size=head_size,
                         dtype=str(layers[0].dtype).removeprefix("torch."), source=source)


def list_state_files(folders: list[Path] | None = None) -> list[StateFileInfo]:
    """Every `*.pth` in `folders` (default: the bundled states folders, then the user's), sorted
    by name within each folder. Files that are not state files are listed with `problem` set."""
    if folders is None:
        bundled = locations.bundled_states_dirs()
        sources = [(folder, "bundled") for folder in bundled] + [(locations.user_states_dir(), "user")]
    else:
        sources = [(Path(folder), "user") for folder in folders]
    found = []
    for folder, source in sources:
        if folder.is_dir():
            found.extend(_describe(file, source) for file in sorted(folder.glob(f"*{STATE_FILE_SUFFIX}")))
    return found


def _describe(file: Path, source: str) -> StateFileInfo:
    try:
        return read_state_file_info(file, source)
    except ModelLoadError as error:
        return StateFileInfo(file, source=source, problem=str(error).removeprefix(f"{file}: "))


def save_state_file(state: RWKVState, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write the matrix part of `state` as a tuned state file other RWKV tools can load.

    Only the [H, N, N] wkv states are stored (that is the format); the token-shift part of the
    state is not, so a loaded file starts with it at zero. float32 by default, which keeps the
    round trip exact (files from state tuning are usually bf16, pass dtype=torch.bfloat16 for
    half the size). Written atomically. Raises StateMismatchError for v4 states, FileWriteError
    (naming the file and the reason) when it cannot be written."""
    tensors = {key: value.to(dtype).clone() for key, value in state.to_time_state().items()}
    return write_atomically(path, lambda temp: torch.save(tensors, temp))
