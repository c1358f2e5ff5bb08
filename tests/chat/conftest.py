"""Chat-layer fixtures: tiny random-weight models per version, pipelines over them, a user home
folder per test, and a scripted stand-in model whose next token is chosen by a rule over the
text so far (random weights write gibberish, so exact chat-format checks need forced text)."""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.chat import locations
from rwkv_chat.pipeline import Pipeline
from rwkv_chat.tokenizer import Tokenizer

NARROW = (2, 64)  # one head of 64: the cheapest shape, for everything that generates
WIDE = (2, 128)  # two heads of 64: state-file layouts, and another shape for mismatch checks


@pytest.fixture(autouse=True)
def chat_home(tmp_path, monkeypatch):
    """Every chat test gets its own user folders (RWKV_CHAT_HOME), never the real ones."""
    home = tmp_path / "home"
    monkeypatch.setenv(locations.HOME_ENV_VAR, str(home))
    return home


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="session")
def load_model(make_model_file) -> Callable[..., RWKV]:
    """load_model(version, shape=NARROW) -> RWKV over a random checkpoint (tests/conftest.py),
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


# ------------------------------------------------------------------ scripted model
class ScriptedState:
    """Stand-in for RWKVState: the whole token history, and the logits after it."""

    def __init__(self, history: tuple[int, ...] = (), logits: torch.Tensor | None = None):
        self.history = history
        self.logits = logits

    @property
    def tokens(self) -> int:
        return len(self.history)


class ScriptedModel:
    """`rule(text_so_far) -> text the model wants to write next`; the model's logits put the first
    token of that text on top (8), `runner_up` second (5) and everything else far below.
    An empty wish puts `idle` on top. `token_rule(history) -> token id` picks the top token
    from the token history instead."""

    vocab_size = 65536

    def __init__(self, tokenizer: Tokenizer, rule: Callable[[str], str] | None = None, *,
                 token_rule: Callable[[tuple[int, ...]], int] | None = None, runner_up: int = 33, idle: int = 34):
        self.tokenizer = tokenizer
        self.rule = rule
        self.token_rule = token_rule
        self.runner_up = runner_up
        self.idle = idle
        self.forward_calls = 0

    def initial_state(self) -> ScriptedState:
        return ScriptedState()

    def forward(self, tokens, state=None):
        self.forward_calls += 1
        history = (state.history if state is not None else ()) + tuple(tokens)
        top = self._next_token(history)
        logits = torch.full((self.vocab_size,), -30.0)
        logits[self.runner_up] = 5.0
        logits[top] = 8.0
        return logits, ScriptedState(history, logits)

    def _next_token(self, history: tuple[int, ...]) -> int:
        if self.token_rule is not None:
            return self.token_rule(history)
        wish = self.rule(self.tokenizer.decode(history))
        return self.tokenizer.encode(wish)[0] if wish else self.idle


def after_last(text: str, marker: str) -> str | None:
    """The text after the last `marker`, or None when there is none."""
    index = text.rfind(marker)
    return None if index < 0 else text[index + len(marker):]


def replies_rule(*replies: str, marker: str = "Assistant:") -> Callable[[str], str]:
    """A rule that writes replies[n - 1] after the n-th `marker` (the last reply repeats)."""

    def rule(text: str) -> str:
        written = after_last(text, marker)
        if written is None:
            return ""
        target = replies[min(text.count(marker), len(replies)) - 1]
        return target[len(written):] if target.startswith(written) else ""

    return rule


@pytest.fixture(name="replies_rule")
def replies_rule_fixture():
    return replies_rule


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
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs folder (read-only or tiny); skips without root."""
    mounted = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        # lazy: a failed torch.save can leave its (deleted) temp file open until garbage collection
        done = subprocess.run(["umount", "-l", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
