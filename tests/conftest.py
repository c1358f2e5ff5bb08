"""Shared fixtures: tiny random-weight checkpoints (built once per session) and the `gpu` marker."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from rwkv_chat.testing.checkpoints import (
    VERSIONS,
    make_checkpoint,
    make_state_file,
    merge_state,
    save_checkpoint,
)

TINY_LAYERS = 2
TINY_EMBD = 128  # head size 64 -> 2 heads
THREE_HEAD_EMBD = 192  # head size 64 -> 3 heads (not a power of two)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _LazyModelFiles(Mapping):
    """version -> checkpoint path; each file is built on first access only."""

    def __init__(self, factory, **options):
        self._factory = factory
        self._options = options

    def __getitem__(self, version: str) -> Path:
        if version not in VERSIONS:
            raise KeyError(version)
        return self._factory(version, **self._options)

    def __iter__(self):
        return iter(VERSIONS)

    def __len__(self) -> int:
        return len(VERSIONS)


@pytest.fixture(scope="session")
def make_model_file(tmp_path_factory):
    """make_model_file(version, **kw) -> Path of a saved random checkpoint (float32 by default).

    kw: n_layer (default 2), n_embd (128), and any other `make_checkpoint` option; plus
    `merged_state_seed=S` to merge a `make_state_file(..., seed=S)` state into the file.
    The same arguments return the same file (built once per session)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple, Path] = {}

    def make(version: str, **kw) -> Path:
        key = (version, tuple(sorted((name, repr(value)) for name, value in kw.items())))
        if key not in built:
            options = dict(kw)
            n_layer = options.pop("n_layer", TINY_LAYERS)
            n_embd = options.pop("n_embd", TINY_EMBD)
            merged_state_seed = options.pop("merged_state_seed", None)
            checkpoint = make_checkpoint(version, n_layer, n_embd, **options)
            if merged_state_seed is not None:
                state = make_state_file(version, n_layer, n_embd, options.get("head_size", 64), seed=merged_state_seed)
                checkpoint = merge_state(checkpoint, state)
            built[key] = save_checkpoint(folder / f"v{version}-{len(built)}.pth", checkpoint)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoints(make_model_file) -> Mapping[str, Path]:
    """version -> path: 2 layers x 128 (2 heads of 64), vocab 65536, float32, seed 0."""
    return _LazyModelFiles(make_model_file)


@pytest.fixture(scope="session")
def three_head_checkpoints(make_model_file) -> Mapping[str, Path]:
    """version -> path: 2 layers x 192 (3 heads of 64: a head count that is not a power of two)."""
    return _LazyModelFiles(make_model_file, n_embd=THREE_HEAD_EMBD)


@pytest.fixture(scope="session")
def make_state_path(tmp_path_factory):
    """make_state_path(version, n_layer=2, n_embd=128, head_size=64, seed=1) -> Path of a saved
    random tuned-state file (bf16, like real ones) matching the tiny checkpoints."""
    folder = tmp_path_factory.mktemp("states")
    built: dict[tuple, Path] = {}

    def make(version, n_layer=TINY_LAYERS, n_embd=TINY_EMBD, head_size=64, seed=1) -> Path:
        key = (version, n_layer, n_embd, head_size, seed)
        if key not in built:
            state = make_state_file(version, n_layer, n_embd, head_size, seed=seed)
            built[key] = save_checkpoint(folder / f"state-v{version}-{len(built)}.pth", state)
        return built[key]

    return make
