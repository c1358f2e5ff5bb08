"""SVG snapshots of the main screen, the help screen, the history screen and the state pane
(tests/tui/__snapshots__; update with `pytest tests/tui --snapshot-update` and look at them).

Everything on screen is fixed: messages and their stats are set directly, file names are fixed,
RWKV_CHAT_HOME is a fixed folder and the history list is a fixed list."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from rwkv_chat.chat.session import Message
from rwkv_chat.pipeline import GenerationStats
from rwkv_chat.tui.screens import history as history_module
from rwkv_chat.tui.screens.history import HistoryEntry, HistoryScreen

from .helpers import wait_until

FIXED_HOME = "/tmp/rwkv-chat-test-home"

REPLY = """Here is a **short** answer with a list:

- one item
- another item

```text
print("hello")
```"""  # "text": syntax colours change with Pygments releases; the snapshots must not


@pytest.fixture
def fixed_home(monkeypatch):
    monkeypatch.setenv("RWKV_CHAT_HOME", FIXED_HOME)


@pytest.fixture
def conversation_app(make_session, app_for, fixed_home):
    """The app over a session showing a fixed two-turn conversation."""
    session, _ = make_session()
    stats = GenerationStats(prompt_tokens=9, generated_tokens=42, time_to_first_token=0.12, seconds=1.5,
                            tokens_per_second=28.0)
    session.messages = [
        Message("user", "What is RWKV?"),
        Message("assistant", "An RNN with transformer-level quality.", stats, "stop"),
        Message("user", "Show me some Markdown."),
        Message("assistant", REPLY, stats, "stop"),
    ]
    return app_for(session)


async def state_files_listed(pilot):
    """The state-file pane is filled by a worker: wait for it so the picture is fixed."""
    chat = pilot.app.screen_stack[0]
    await wait_until(pilot, lambda: chat.listed_state_files is not None)
    chat.prompt.cursor_blink = False  # waiting may have caught the cursor mid-blink: keep it drawn
    await pilot.pause()


def test_main_screen(snap_compare, conversation_app):
    assert snap_compare(conversation_app, terminal_size=(100, 30), run_before=state_files_listed)


def test_main_screen_80x24(snap_compare, conversation_app):
    assert snap_compare(conversation_app, terminal_size=(80, 24), run_before=state_files_listed)


def test_help_screen(snap_compare, conversation_app):
    assert snap_compare(conversation_app, terminal_size=(100, 30), press=["f1"], run_before=state_files_listed)


def test_state_pane(snap_compare, conversation_app):
    assert snap_compare(conversation_app, terminal_size=(100, 30), press=["f3", "down"],
                        run_before=state_files_listed)


def test_history_screen(snap_compare, conversation_app, monkeypatch):
    entries = [
        HistoryEntry("Write a haiku about the sea, please, with a long first message that gets cut",
                     datetime(2024, 5, 2, 9, 30), "tiny-v7.pth", 6, conversation_id="0f3c"),
        HistoryEntry("What is RWKV?", datetime(2024, 5, 1, 18, 0), "tiny-v7.pth", 2,
                     path=Path(FIXED_HOME) / "snapshots/2024-05-01_18-00-00.rwkvchat"),
        HistoryEntry("broken.rwkvchat", None, "", 0, path=Path(FIXED_HOME) / "snapshots/broken.rwkvchat",
                     problem="not a readable rwkv-chat snapshot (header too large)"),
    ]
    monkeypatch.setattr(history_module, "load_entries", lambda store, search="", folder=None: entries)

    async def open_history(pilot):
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.loaded)

    assert snap_compare(conversation_app, terminal_size=(100, 30), run_before=open_history)
