"""Shared fixtures: tiny random-weight checkpoints (built once per session), models and pipelines
over them, the scripted stand-in model, and the `gpu` marker."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.pipeline import Pipeline
from rwkv_chat.testing.checkpoints import (
    VERSIONS,
    make_checkpoint,
    make_state_file,
    merge_state,
    save_checkpoint,
)
from rwkv_chat.tokenizer import Tokenizer

from .scripted_model import ScriptedModel

TINY_LAYERS = 2
TINY_EMBD = 128  # head size 64 -> 2 heads
THREE_HEAD_EMBD = 192  # head size 64 -> 3 heads (not a power of two)
NARROW = (2, 64)  # one head of 64: the cheapest shape, for everything that generates
WIDE = (2, 128)  # two heads of 64: state-file layouts, and another shape for mismatch checks


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


# ------------------------------------------------------------------ models and pipelines
@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="session")
def load_model(make_model_file) -> Callable[..., RWKV]:
    """load_model(version, shape=NARROW) -> RWKV over a random checkpoint (make_model_file),
    built and loaded once per session."""
    cache: dict = {}

    def load(version: str, shape: tuple[int, int] = NARROW) -> RWKV:
        if (version, shape) not in cache:
            n_layer, n_embd = shape
            path = make_model_file(version, n_layer=n_layer, n_embd=n_embd)
            cache[version, shape] = RWKV(path, strategy="cpu fp32", progress=None)
        return cache[version, shape]

    return load


@pytest.fixture(scope="session")
def make_pipeline(load_model, tokenizer) -> Callable[..., Pipeline]:
    def make(version: str = "7", shape: tuple[int, int] = NARROW) -> Pipeline:
        return Pipeline(load_model(version, shape), tokenizer)

    return make


@pytest.fixture(scope="session")
def pipe(make_pipeline) -> Pipeline:
    """The v7 2x64 pipeline most tests use."""
    return make_pipeline("7")


@pytest.fixture
def scripted(tokenizer) -> Callable[..., Pipeline]:
    """scripted(rule=None, **ScriptedModel options) -> Pipeline over a ScriptedModel."""

    def make(rule: Callable[[str], str] | None = None, **options) -> Pipeline:
        return Pipeline(ScriptedModel(tokenizer, rule, **options), tokenizer)

    return make


# ------------------------------------------------------------------ state comparison
def assert_same_state(actual, expected) -> None:
    """Bit-identical recurrent states: token count, logits and every layer tensor."""
    assert actual.tokens == expected.tokens
    assert (actual.logits is None) == (expected.logits is None)
    if actual.logits is not None:
        assert torch.equal(actual.logits, expected.logits)
    assert len(actual.layers) == len(expected.layers)
    for got_layer, want_layer in zip(actual.layers, expected.layers):
        assert len(got_layer) == len(want_layer)
        for got, want in zip(got_layer, want_layer):
            assert torch.equal(got, want)


@pytest.fixture(name="assert_same_state")
def assert_same_state_fixture():
    return assert_same_state


@pytest.fixture
def no_hang():
    """Fail instead of hanging: whatever blocks (an open() of a FIFO) is interrupted after 20 s."""
    def timed_out(*_):
        raise TimeoutError("hung (on a special file?)")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.pth"
    os.mkfifo(path)
    return path
