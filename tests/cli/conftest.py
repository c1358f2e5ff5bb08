"""CLI fixtures: a tiny random-weight checkpoint, state files, a snapshot, a temporary user home."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rwkv_chat.chat import locations
from rwkv_chat.testing.checkpoints import (
    make_checkpoint,
    make_state_file,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def user_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv(locations.HOME_ENV_VAR, str(home))
    for name in ("RWKV_CHAT_MODEL", "RWKV_CHAT_STRATEGY"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-models") / "tiny-v7.pth"
    save_checkpoint(path, make_checkpoint("7", 2, 64, seed=5))
    return path


@pytest.fixture(scope="session")
def state_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-states") / "tuned.pth"
    save_checkpoint(path, make_state_file("7", 2, 64, seed=3))
    return path


@pytest.fixture
def snapshot_path(model_path, user_home) -> Path:
    """A saved one-turn conversation with the tiny model (short reply: max_tokens 5)."""
    from rwkv_chat import RWKV, Pipeline
    from rwkv_chat.chat.session import ChatSession
    from rwkv_chat.sampling import SamplingSettings

    session = ChatSession(Pipeline(RWKV(model_path, progress=None)), SamplingSettings(max_tokens=5))
    for _ in session.send("What is RWKV?"):
        pass
    return session.save()


class FakeApp:
    """Stands in for the TUI: records what make_app was given."""

    made: list = []

    def __init__(self, session, **options):
        self.session, self.options = session, options
        FakeApp.made.append(self)

    def run(self):
        pass


@pytest.fixture
def fake_app(monkeypatch):
    import rwkv_chat.tui.app as app_module

    FakeApp.made = []
    monkeypatch.setattr(app_module, "make_app", FakeApp)
    return FakeApp
