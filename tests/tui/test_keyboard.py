"""Pilot tests of keyboard-only use: Enter never loses typed text, Esc comes back to the message
box, the conversation takes focus (select, scroll, copy), each reply says how it ended, the
theme is kept, and the system prompt is edited in the app."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from textual import events

from rwkv_chat.tui.keys import KEY_BINDINGS
from rwkv_chat.tui.prefs import prefs_path
from rwkv_chat.chat.session import ChatSession, Message
from rwkv_chat.pipeline import GenerationStats
from rwkv_chat.tui.screens.chat import ChatScreen
from rwkv_chat.tui.screens.help import key_label, keys_table
from rwkv_chat.tui.screens.persona import PersonaDialog
from rwkv_chat.tui.widgets.conversation import FINISH_LABELS, Conversation, MessageView, code_blocks, subtitle
from rwkv_chat.tui.widgets.settings import SettingsPane

from .helpers import chat, run_app, wait_for_reply, wait_until


def post_keys(app, text: str, then: str | None = "enter") -> None:
    """Queue a key event per character (and `then`) at once, as a terminal delivers a fast burst."""
    for char in text:
        app.post_message(events.Key(char, char))
    if then:
        app.post_message(events.Key(then, {"enter": "\r", "ctrl+j": "\n"}.get(then)))


CODE_REPLY = "Two blocks:\n\n```python\nprint(1)\n```\n\nand\n\n```\nx = 2\ny = 3\n```\n"


def long_conversation(session) -> None:
    stats = GenerationStats(prompt_tokens=3, generated_tokens=5, time_to_first_token=0.1, seconds=0.5,
                            tokens_per_second=10.0)
    messages = []
    for turn in range(8):
        messages.append(Message("user", f"question {turn}"))
        messages.append(Message("assistant", "\n".join(f"answer {turn} line {n}" for n in range(4)), stats, "stop"))
    messages[-1] = Message("assistant", CODE_REPLY, stats, "length")
    session.messages = messages


# ------------------------------------------------------------------ input is never lost


def test_enter_right_after_a_burst_of_keys_sends_all_of_them(make_session, app_for):
    session, _ = make_session()
    text = "Hello! How are you today?"

    async def scenario(pilot):
        post_keys(pilot.app, text)  # nothing runs between these: all are queued before Enter is read
        await wait_until(pilot, lambda: session.messages)
        await wait_for_reply(pilot)
        assert session.messages[0].text == text
        assert chat(pilot).prompt.text == ""

    run_app(app_for(session), scenario)


def test_ctrl_j_in_a_burst_puts_the_newline_where_it_was_typed(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        post_keys(pilot.app, "abc", then="ctrl+j")
        post_keys(pilot.app, "def", then="ctrl+j")
        post_keys(pilot.app, "ghi")
        await wait_until(pilot, lambda: session.messages)
        await wait_for_reply(pilot)
        assert session.messages[0].text == "abc\ndef\nghi"
        assert chat(pilot).prompt.text == ""

    run_app(app_for(session), scenario)


def test_keys_typed_after_enter_stay_in_the_box(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        post_keys(pilot.app, "first")
        post_keys(pilot.app, "second", then=None)
        await wait_until(pilot, lambda: session.messages)
        await wait_for_reply(pilot)
        assert session.messages[0].text == "first"
        assert chat(pilot).prompt.text == "second"

    run_app(app_for(session), scenario)


def test_a_message_refused_while_busy_stays_in_the_box(make_session, app_for):
    session, spy = make_session(max_tokens=100)

    async def scenario(pilot):
        spy.hold_at(3)
        post_keys(pilot.app, "one")
        await wait_until(pilot, spy.held.is_set)
        post_keys(pilot.app, "two")
        await pilot.pause(0.1)
        assert chat(pilot).prompt.text == "two"
        spy.release()
        await wait_for_reply(pilot)
        assert [m.text for m in session.messages if m.role == "user"] == ["one"]

    run_app(app_for(session), scenario)


def test_a_paste_with_newlines_is_inserted_and_never_sends(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        prompt = chat(pilot).prompt
        pilot.app.post_message(events.Paste("line one\nline two\n"))  # the app hands it to the box
        await pilot.pause(0.1)
        assert prompt.text == "line one\nline two\n"
        assert session.messages == [] and not chat(pilot).replying

    run_app(app_for(session), scenario)


# ------------------------------------------------------------------ Esc and focus


@pytest.mark.parametrize("key, target", [("f4", "#setting-temperature"), ("f3", "#state-list")])
def test_escape_from_a_pane_returns_to_the_message_box(make_session, app_for, key, target):
    session, _ = make_session()

    async def scenario(pilot):
        await pilot.press(key)
        await pilot.pause()
        assert pilot.app.focused is chat(pilot).query_one(target)
        await pilot.press("escape")
        assert pilot.app.focused is chat(pilot).prompt
        await pilot.press("h", "i")
        assert chat(pilot).prompt.text == "hi"
        assert chat(pilot).query_one(SettingsPane).settings == session.settings

    run_app(app_for(session), scenario)


def test_conversation_keys_select_scroll_and_return(make_session, app_for):
    session, _ = make_session()
    long_conversation(session)

    async def scenario(pilot):
        conversation = chat(pilot).query_one(Conversation)
        last = len(session.messages) - 1
        await pilot.press("alt+up")
        assert pilot.app.focused is conversation and conversation.selected == last
        assert conversation.selected_view.has_class("-selected")
        await pilot.press("up", "up")
        assert conversation.selected == last - 2
        await pilot.press("home")
        await pilot.pause()
        assert conversation.selected == 0 and conversation.scroll_y == 0
        await pilot.press("pagedown")
        await pilot.pause()
        assert conversation.scroll_y > 0
        await pilot.press("end")
        await pilot.pause()
        assert conversation.selected == last and conversation.scroll_y == conversation.max_scroll_y
        await pilot.press("pageup")
        await pilot.pause()
        assert conversation.scroll_y < conversation.max_scroll_y
        await pilot.press("down")  # already the last: stays
        assert conversation.selected == last
        await pilot.press("escape")
        assert pilot.app.focused is chat(pilot).prompt
        assert not any(view.has_class("-selected") for view in conversation.query(MessageView))

    run_app(app_for(session), scenario, size=(100, 30))


def test_copy_the_message_and_each_code_block(make_session, app_for):
    session, _ = make_session()
    long_conversation(session)
    app = app_for(session)
    copied: list[str] = []
    app.copy_to_clipboard = copied.append

    async def scenario(pilot):
        await pilot.press("alt+up", "c", "b", "b", "b")
        assert copied == [CODE_REPLY, "print(1)", "x = 2\ny = 3", "print(1)"]
        await pilot.press("up", "c", "b")  # a user message: no code block, nothing copied
        assert copied[4:] == ["question 7"]

    run_app(app, scenario)


def test_code_blocks():
    assert code_blocks(CODE_REPLY) == ["print(1)", "x = 2\ny = 3"]
    assert code_blocks("no code") == []
    assert code_blocks("~~~\nopen to the end\nmore") == ["open to the end\nmore"]
    assert code_blocks("````md\n```\ninner\n```\n````") == ["```\ninner\n```"]


# ------------------------------------------------------------------ finish reasons


@pytest.mark.parametrize("reason", ["cancelled", "length", "eos", "stop"])
def test_subtitle_names_how_each_reply_ended(reason):
    stats = GenerationStats(generated_tokens=4, tokens_per_second=8.0, time_to_first_token=0.5)
    line = subtitle(Message("assistant", "x", stats, reason))
    assert line == f"{FINISH_LABELS[reason]} · 4 tokens, 8.0 tok/s, first token 0.50 s"
    assert subtitle(Message("user", "x")) == ""


def test_replies_show_their_finish_reason(make_session, app_for):
    session, spy = make_session(max_tokens=3)

    async def scenario(pilot):
        post_keys(pilot.app, "hi")
        await wait_until(pilot, lambda: session.messages)
        await wait_for_reply(pilot)
        view = chat(pilot).query(MessageView).last()
        assert session.messages[-1].finish_reason in ("length", "stop")
        assert str(view.border_subtitle).startswith(FINISH_LABELS[session.messages[-1].finish_reason] + " · ")
        session.settings = session.settings.replace(max_tokens=200)
        spy.hold_at(len(spy.seen) + 3)  # reads count across replies: hold before this reply's 2nd token
        post_keys(pilot.app, "more")
        await wait_until(pilot, spy.held.is_set)
        await pilot.press("escape")
        spy.release()
        await wait_for_reply(pilot)
        assert session.messages[-1].finish_reason == "cancelled"
        assert str(chat(pilot).query(MessageView).last().border_subtitle).startswith("stopped · ")

    run_app(app_for(session), scenario)


# ------------------------------------------------------------------ theme, persona, settings, help


def test_the_theme_picked_is_kept_for_the_next_run(make_session, app_for):
    session, _ = make_session()

    async def pick(pilot):
        pilot.app.theme = "nord"
        await wait_until(pilot, prefs_path().exists)  # written by a worker

    run_app(app_for(session), pick)
    assert json.loads(prefs_path().read_text())["theme"] == "nord"

    async def check(pilot):
        assert pilot.app.theme == "nord"

    run_app(app_for(session), check)


def test_a_broken_prefs_file_is_ignored(make_session, app_for):
    session, _ = make_session()
    prefs_path().parent.mkdir(parents=True, exist_ok=True)
    prefs_path().write_text("{not json")

    async def check(pilot):
        assert pilot.app.theme == "textual-dark"

    run_app(app_for(session), check)


def test_persona_dialog_sets_the_preamble_of_an_empty_conversation(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, PersonaDialog))
        await pilot.press(*"You are Bob.")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
        await wait_for_reply(pilot)  # the new start is prefilled by a session job
        assert session.preamble == "You are Bob.\n\n"
        expected = ChatSession(session.pipeline, preamble="You are Bob.").state
        assert session.state.tokens == expected.tokens > 0
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, PersonaDialog))
        await pilot.press("x", "escape")  # cancelled: unchanged
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
        assert session.preamble == "You are Bob.\n\n"

    run_app(app_for(session), scenario)


def test_set_preamble_keeps_a_running_conversation_until_reset(make_session):
    session, _ = make_session()
    list(session.send("hello"))
    state = session.state
    session.set_preamble("Be brief.")
    assert session.state is state and len(session.messages) == 2
    session.reset()
    assert session.messages == [] and session.state.tokens == ChatSession(session.pipeline, preamble="Be brief.").state.tokens


def test_settings_errors_use_the_shown_labels_and_a_stale_error_clears(make_session, app_for):
    session, _ = make_session()

    async def scenario(pilot):
        pane = chat(pilot).query_one(SettingsPane)
        error = pane.query_one("#settings-error")
        await pilot.press("f4")
        box = pane.query_one("#setting-penalty_decay")
        box.value = "2"
        box.focus()
        await pilot.press("enter")
        assert str(error.render()).startswith("penalty decay must be")
        max_tokens = pane.query_one("#setting-max_tokens")
        max_tokens.value = "-1"
        max_tokens.focus()
        await pilot.press("enter")
        assert str(error.render()).startswith("max tokens must be")
        await pilot.press("enter")  # the old value is back: applying it again clears the error
        assert not error.has_class("-visible")

    run_app(app_for(session), scenario)


def test_help_lists_every_key():
    """F1 shows this table: every remappable key with its id."""
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(keys_table({binding.id: binding.key for binding in KEY_BINDINGS}))
    text = console.export_text()
    for binding in KEY_BINDINGS:
        assert binding.id in text and key_label(binding.key) in text
