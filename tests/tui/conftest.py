"""TUI fixtures: tiny random-weight models (2 layers x 64, v7 and v6), a fresh ChatSession per
test over them, user folders in a temporary RWKV_CHAT_HOME, and a spy on the settings each
token is sampled with (which can hold the reply at a chosen token)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rwkv_chat import RWKV
from rwkv_chat.chat import locations
from rwkv_chat.config import Config
from rwkv_chat.chat.session import ChatSession
from rwkv_chat.engine import model as engine_model
from rwkv_chat.pipeline import Pipeline
from rwkv_chat.sampling import SamplingSettings
from rwkv_chat.testing.checkpoints import (
    make_checkpoint,
    make_state_file,
    save_checkpoint,
)
from rwkv_chat.tokenizer import Tokenizer
from rwkv_chat.tui.app import make_app

from .helpers import SettingsSpy

SHAPE = (2, 64)  # layers x width: one head of 64
MAX_TEST_MODEL_BYTES = 64 << 20


@pytest.fixture(autouse=True)
def user_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own user folders, never the real ones."""
    home = tmp_path / "home"
    monkeypatch.setenv(locations.HOME_ENV_VAR, str(home))
    return home


@pytest.fixture(autouse=True)
def no_heavy_models(monkeypatch):
    """Loading anything bigger than a test checkpoint (a real model, the demo) fails loudly."""
    original = engine_model.RWKV.__init__

    def guarded(self, model_path, *args, **kwargs):
        path = Path(model_path)
        if path.is_file() and path.stat().st_size > MAX_TEST_MODEL_BYTES:
            raise AssertionError(f"a TUI test tried to load a large model: {path}")
        original(self, model_path, *args, **kwargs)

    monkeypatch.setattr(engine_model.RWKV, "__init__", guarded)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{version: path} with fixed file names (they appear on screen)."""
    folder = tmp_path_factory.mktemp("tui-models")
    paths = {}
    for version in ("7", "6"):
        path = folder / f"tiny-v{version}.pth"
        save_checkpoint(path, make_checkpoint(version, *SHAPE, seed=5))
        paths[version] = path
    return paths


@pytest.fixture(scope="session")
def models(checkpoints) -> dict[str, RWKV]:
    return {version: RWKV(path, "cpu fp32", progress=None) for version, path in checkpoints.items()}


@pytest.fixture(params=["7", "6"], ids=["v7", "v6"])
def version(request) -> str:
    """Run a test with both model versions."""
    return request.param


@pytest.fixture
def make_session(models, tokenizer):
    """make_session(version="7", **settings) -> (session, spy): a fresh session over a fresh
    Pipeline (so the spy sees only this test), small max_tokens, fixed seed."""

    def make(version: str = "7", **settings) -> tuple[ChatSession, SettingsSpy]:
        pipeline = Pipeline(models[version], tokenizer)
        spy = SettingsSpy(pipeline)
        values = {"max_tokens": 12, "seed": 1, **settings}
        return ChatSession(pipeline, SamplingSettings(**values)), spy

    return make


@pytest.fixture
def state_folder(tmp_path) -> Path:
    """A states folder with a v7/v6 state file that fits (2 x 64), one for another size, and
    one that lists as fitting but cannot be loaded (NaN values)."""
    folder = tmp_path / "states"
    folder.mkdir()
    save_checkpoint(folder / "a-fits.pth", make_state_file("7", *SHAPE, seed=3))
    save_checkpoint(folder / "b-bigger.pth", make_state_file("7", 3, 128, seed=3))
    broken = make_state_file("7", *SHAPE, seed=4)
    broken["blocks.0.att.time_state"][0, 0, 0] = float("nan")
    save_checkpoint(folder / "c-broken.pth", broken)
    return folder


@pytest.fixture
def app_for(state_folder):
    """app_for(session, **make_app options) with the test's state folder."""

    def build(session, **options):
        options.setdefault("state_folders", [state_folder])
        options.setdefault("config", Config())
        return make_app(session, **options)

    return build
