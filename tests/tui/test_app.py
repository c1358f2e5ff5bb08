"""Pilot tests of the chat screen with real tiny random-weight models: every key binding, the
panes, snapshots and state files."""
from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from rwkv_chat.config import Config
from rwkv_chat.tui.keys import DEFAULT_KEYS
from rwkv_chat.tui.screens.chat import ChatScreen
from rwkv_chat.tui.screens.help import HelpScreen, keys_table
from rwkv_chat.tui.screens.history import HistoryScreen
from rwkv_chat.tui.widgets.conversation import MessageView
from rwkv_chat.tui.widgets.prompt import PromptInput
from rwkv_chat.tui.widgets.settings import SettingsPane
from rwkv_chat.tui.widgets.status import StatusLine

from .helpers import chat, run_app, send, shown, wait_for_reply, wait_until


def in_session(session) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in session.messages]


# ------------------------------------------------------------------ sending


def test_enter_sends_and_the_reply_streams_in(make_session, app_for, version):
    session, _ = make_session(version)

    async def scenario(pilot):
        await send(pilot, "Hello there")
        await wait_for_reply(pilot)
        assert in_session(session)[0] == ("user", "Hello there")
        assert shown(pilot) == in_session(session)
        assert session.messages[1].stats.generated_tokens > 0
        assert chat(pilot).prompt.text == ""
        status = str(chat(pilot).query_one(StatusLine).render())
        assert f"{session.state.tokens} tokens in state" in status
        assert "tok/s" in status and f"RWKV v{version}" in status and f"tiny-v{version}.pth" in status

    run_app(app_for(session), scenario)


def test_ctrl_j_adds_a_newline_instead_of_sending(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await pilot.click(PromptInput)
        await pilot.press("a", "ctrl+j", "b")
        assert chat(pilot).prompt.text == "a\nb"
        assert session.messages == []

    run_app(app_for(session), scenario)


# ------------------------------------------------------------------ F5-F8


@pytest.mark.parametrize(("key", "field", "delta"), [
    ("f5", "temperature", -0.1), ("f6", "temperature", 0.1), ("f7", "top_p", -0.05), ("f8", "top_p", 0.05),
])
def test_sampling_keys_change_the_shown_value_and_the_next_token(make_session, app_for, key, field, delta):
    session, spy = make_session(max_tokens=8)
    before = getattr(session.settings, field)
    expected = round(before + delta, 2)

    async def scenario(pilot):
        spy.hold_at(4)  # reads: 1 = reply setup, 2.. = one per token: hold before the 3rd token
        await send(pilot, "Hi")
        await wait_until(pilot, spy.held.is_set)
        await pilot.press(key)
        pane = chat(pilot).query_one(SettingsPane)
        assert pane.value_text(field) == f"{expected:g}"
        assert getattr(session.settings, field) == pytest.approx(expected)
        spy.release()
        await wait_for_reply(pilot)
        used = [getattr(s, field) for s in spy.seen]
        assert used[:3] == [pytest.approx(before)] * 3  # tokens before the key press
        assert used[3:] and all(value == pytest.approx(expected) for value in used[3:])

    run_app(app_for(session), scenario)


def test_sampling_keys_work_while_another_pane_has_focus(make_session, app_for, version):
    session, _ = make_session(version)

    async def scenario(pilot):
        await pilot.press("f3")  # the state-file list has focus now
        await pilot.pause()
        await pilot.press("f6", "f6", "f7")
        assert session.settings.temperature == pytest.approx(1.2)
        assert session.settings.top_p == pytest.approx(0.25)

    run_app(app_for(session), scenario)


def test_remapped_keys_from_the_config(make_session, app_for):
    session, _ = make_session()
    config = Config(keys={**DEFAULT_KEYS, "temperature_up": "f9", "temperature_down": "f6"})

    async def scenario(pilot):
        await pilot.press("f9", "f9")
        assert session.settings.temperature == pytest.approx(1.2)
        await pilot.press("f6")  # now lowers it
        assert session.settings.temperature == pytest.approx(1.1)

    run_app(app_for(session, config=config), scenario)


# ------------------------------------------------------------------ settings pane


def test_settings_pane_accepts_valid_values_and_refuses_bad_ones(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        pane = chat(pilot).query_one(SettingsPane)
        await pilot.press("f4")  # focus the temperature box
        await pilot.pause()
        box = pane.query_one("#setting-temperature")
        assert pilot.app.focused is box
        box.value = "abc"
        await pilot.press("enter")
        assert "temperature must be a number" in str(pane.query_one("#settings-error").render())
        assert box.value == "1" and session.settings.temperature == 1.0
        box.value = "9"  # out of range: SamplingSettings refuses it
        await pilot.press("enter")
        assert "temperature must be a number from 0 to 5" in str(pane.query_one("#settings-error").render())
        assert session.settings.temperature == 1.0
        box.value = "0.5"
        await pilot.press("enter")
        assert session.settings.temperature == 0.5
        assert not pane.query_one("#settings-error").has_class("-visible")
        top_k = pane.query_one("#setting-top_k")
        top_k.value = "40"
        top_k.focus()
        await pilot.press("tab")  # leaving a box applies it too
        assert session.settings.top_k == 40

    run_app(app_for(session), scenario)


# ------------------------------------------------------------------ reply keys


def test_escape_stops_a_reply(make_session, app_for, version):
    session, spy = make_session(version, max_tokens=200)

    async def scenario(pilot):
        spy.hold_at(5)
        await send(pilot, "Tell me a long story")
        await wait_until(pilot, spy.held.is_set)
        await pilot.press("escape")
        spy.release()
        await wait_for_reply(pilot)
        reply = session.messages[-1]
        assert reply.finish_reason == "cancelled"
        assert reply.stats.generated_tokens <= 5
        assert shown(pilot) == in_session(session)
        assert not any(view.streaming for view in chat(pilot).query(MessageView))

    run_app(app_for(session), scenario)


def test_regenerate_restores_the_state_before_the_reply(make_session, app_for, version):
    session, _ = make_session(version, max_tokens=10, seed=7)

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        first_text, first_tokens = session.messages[-1].text, session.state.tokens
        await pilot.press("ctrl+r")
        await wait_for_reply(pilot)
        # same seed from the restored state: the very same reply, the same token count
        assert session.messages[-1].text == first_text
        assert session.state.tokens == first_tokens
        assert len(session.messages) == 2 and shown(pilot) == in_session(session)

    run_app(app_for(session), scenario)


def test_continue_extends_the_last_reply(make_session, app_for):
    session, _ = make_session(max_tokens=6)

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        assert session.messages[-1].finish_reason == "length"
        first = session.messages[-1].stats.generated_tokens
        await pilot.press("ctrl+g")
        await wait_for_reply(pilot)
        assert len(session.messages) == 2
        assert session.messages[-1].stats.generated_tokens > first
        assert shown(pilot) == in_session(session)

    run_app(app_for(session), scenario)


def test_edit_last_message_and_resend(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        await pilot.press("ctrl+l")
        assert chat(pilot).prompt.text == "Hi"
        assert "Editing" in chat(pilot).prompt.border_title
        chat(pilot).prompt.text = "Hello instead"
        await pilot.press("enter")
        await wait_for_reply(pilot)
        assert [m.text for m in session.messages if m.role == "user"] == ["Hello instead"]
        assert len(session.messages) == 2 and shown(pilot) == in_session(session)

    run_app(app_for(session), scenario)


def test_escape_cancels_an_edit(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        await pilot.press("ctrl+l", "escape")
        assert chat(pilot).prompt.text == "" and not chat(pilot).editing
        assert [m.text for m in session.messages if m.role == "user"] == ["Hi"]

    run_app(app_for(session), scenario)


def test_keys_that_change_the_conversation_wait_for_the_reply(make_session, app_for):
    session, spy = make_session(max_tokens=50)

    async def scenario(pilot):
        spy.hold_at(3)
        await send(pilot, "Hi")
        await wait_until(pilot, spy.held.is_set)
        await pilot.press("ctrl+n", "ctrl+r")
        assert session.busy and session.messages[0].text == "Hi"
        spy.release()
        await wait_for_reply(pilot)
        assert len(session.messages) == 2

    run_app(app_for(session), scenario)


def test_new_conversation(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        await pilot.press("ctrl+n")
        await wait_for_reply(pilot)  # the new conversation is a session job
        assert session.messages == [] and shown(pilot) == []
        assert chat(pilot).query_one("#placeholder").display
        assert "0 tokens in state" in str(chat(pilot).query_one(StatusLine).render())

    run_app(app_for(session), scenario)


def test_quitting_mid_reply_stops_the_generation(make_session, app_for):
    session, spy = make_session(max_tokens=2000)

    async def scenario(pilot):
        spy.hold_at(4)
        await send(pilot, "Hi")
        await wait_until(pilot, spy.held.is_set)
        await pilot.press("ctrl+q")
        spy.release()

    run_app(app_for(session), scenario)
    reply = session.messages[-1]
    deadline = time.monotonic() + 10
    while session.busy and time.monotonic() < deadline:  # the worker thread ends on its own
        time.sleep(0.01)
    assert not session.busy
    assert reply.finish_reason == "cancelled" and reply.stats.generated_tokens < 10


# ------------------------------------------------------------------ snapshots


def test_save_then_open_restores_the_conversation_on_screen(make_session, app_for, user_home):
    session, _ = make_session()

    async def scenario(pilot):
        await send(pilot, "Remember this")
        await wait_for_reply(pilot)
        saved = in_session(session)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: len(list((user_home / "snapshots").glob("*.rwkvchat"))) == 1)
        await pilot.press("ctrl+n")
        await wait_for_reply(pilot)  # the new conversation is a session job
        assert shown(pilot) == []
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.loaded)
        await pilot.press("enter")
        await wait_until(pilot, lambda: shown(pilot) == saved)
        assert in_session(session) == saved

    run_app(app_for(session), scenario)


def test_delete_in_the_open_dialog_asks_once_then_deletes_the_highlighted_file(make_session, app_for, user_home):
    session, _ = make_session()
    folder = user_home / "snapshots"

    async def scenario(pilot):
        for text in ("Keep me", "And me"):  # two conversations, two files
            await pilot.press("ctrl+n")
            await send(pilot, text)
            await wait_for_reply(pilot)
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: len(list(folder.glob("*.rwkvchat"))) == (1 if text == "Keep me" else 2))
        before = in_session(session)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.loaded)
        dialog = pilot.app.screen
        options = dialog.query_one("#history-list")
        files = [entry for entry in dialog.entries if entry.path is not None]
        options.highlighted = dialog.entries.index(files[0])
        await pilot.pause()
        await pilot.press("delete")
        assert len(list(folder.glob("*.rwkvchat"))) == 2  # the first press only asks
        assert "again" in str(dialog.query_one("#history-box").border_subtitle)
        await pilot.press("down")  # moving on forgets the question
        await pilot.pause()
        assert dialog.armed is None
        second = dialog.highlighted.path
        await pilot.press("delete", "delete")
        await wait_until(pilot, lambda: not second.exists())
        await wait_until(pilot, lambda: len(dialog.entries) == 1)
        assert len(list(folder.glob("*.rwkvchat"))) == 1 and options.option_count == 1
        await pilot.press("delete", "delete")
        await wait_until(pilot, lambda: dialog.query_one("#history-empty").display)
        assert list(folder.glob("*.rwkvchat")) == [] and not options.display
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
        assert in_session(session) == before and shown(pilot) == before

    run_app(app_for(session), scenario)


def test_open_dialog_escape_keeps_the_conversation(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        before = in_session(session)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.loaded)
        assert "No conversations yet" in str(pilot.app.screen.query_one("#history-empty").render())
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
        assert in_session(session) == before and shown(pilot) == before

    run_app(app_for(session), scenario)


# ------------------------------------------------------------------ state files


def test_state_file_from_the_pane_starts_a_new_conversation(make_session, app_for, state_folder, version):
    session, _ = make_session(version)

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        await wait_until(pilot, lambda: chat(pilot).listed_state_files is not None)
        await pilot.press("f3")  # focus the state-file list; the first entry fits
        await pilot.pause()
        await pilot.press("enter")
        await wait_for_reply(pilot)  # the state file is read and prefilled in a worker
        assert session.state_file == state_folder / "a-fits.pth"
        assert session.messages == [] and shown(pilot) == []
        assert "state a-fits" in str(chat(pilot).query_one(StatusLine).render())

    run_app(app_for(session), scenario)


def test_state_files_that_do_not_fit_or_do_not_load_leave_the_conversation(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await send(pilot, "Hi")
        await wait_for_reply(pilot)
        before = in_session(session)
        pane_list = chat(pilot).query_one("#state-list")
        await wait_until(pilot, lambda: chat(pilot).listed_state_files is not None)
        await pilot.press("f3")
        await pilot.pause()
        for index in (1, 2):  # b-bigger (does not fit), c-broken (fits, fails to load)
            pane_list.highlighted = index
            await pilot.press("enter")
            await wait_for_reply(pilot)
            assert session.state_file is None
            assert in_session(session) == before and shown(pilot) == before
        messages = [n.message for n in pilot.app._notifications]
        assert any("another model size" in m for m in messages)
        assert any("NaN" in m for m in messages)

    run_app(app_for(session), scenario)


def test_state_file_from_the_command_palette(make_session, app_for, state_folder):
    session, _ = make_session()

    async def scenario(pilot):
        await wait_until(pilot, lambda: chat(pilot).listed_state_files is not None)
        commands = {c.title: c for c in pilot.app.get_system_commands(chat(pilot))}
        assert "Load state file: a-fits" in commands
        assert "Load state file: b-bigger" not in commands  # does not fit
        commands["Load state file: a-fits"].callback()
        await wait_until(pilot, lambda: session.state_file is not None)
        await wait_for_reply(pilot)
        assert session.state_file == state_folder / "a-fits.pth"

    run_app(app_for(session), scenario)


# ------------------------------------------------------------------ help and layout


def test_help_lists_the_current_keys(make_session, app_for):
    session, _ = make_session()
    config = Config(keys={**DEFAULT_KEYS, "regenerate": "f9"})

    async def scenario(pilot):
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen))
        console = Console(width=100, record=True, file=io.StringIO())
        console.print(keys_table(pilot.app.screen.keys))
        assert re.search(r"^F9 +Regenerate the last reply", console.export_text(), re.MULTILINE)
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))

    run_app(app_for(session, config=config), scenario)


def test_side_panes_collapse_on_narrow_terminals_and_toggle(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        side = chat(pilot).query_one("#side")
        assert not side.display  # 80 columns: hidden
        await pilot.press("f2")
        assert side.display
        await pilot.press("f2")
        assert not side.display
        await pilot.press("f6")  # still works with the pane hidden, and says so
        assert session.settings.temperature == pytest.approx(1.1)

    run_app(app_for(session), scenario, size=(80, 24))


def test_demo_note_and_welcome_text(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        assert "Tiny demo" in str(chat(pilot).query_one(StatusLine).render())
        assert "trained on chit-chat" in str(chat(pilot).query_one("#placeholder").render())

    run_app(app_for(session, demo_note="Tiny demo model: pass --model", welcome="A model trained on chit-chat."),
            scenario)
