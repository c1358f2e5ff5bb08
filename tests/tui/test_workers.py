"""Disk and model work runs in Textual thread workers, never on the UI thread; the screen draws
the conversation the session reports."""
from __future__ import annotations

import threading

from rwkv_chat.chat import state_files
from rwkv_chat.tui.widgets.conversation import MessageView

from .helpers import chat, run_app, wait_for_reply, wait_until


def test_state_files_are_listed_and_loaded_off_the_ui_thread(make_session, app_for, state_folder, monkeypatch):
    session, _ = make_session()
    threads = {}
    real_list, real_load = state_files.list_state_files, session.load_state_file

    def listing(*args, **kwargs):
        threads["list"] = threading.current_thread()
        return real_list(*args, **kwargs)

    def loading(path):
        threads["load"] = threading.current_thread()
        return real_load(path)

    monkeypatch.setattr(state_files, "list_state_files", listing)
    monkeypatch.setattr(session, "load_state_file", loading)

    async def scenario(pilot):
        ui = threading.current_thread()
        await wait_until(pilot, lambda: chat(pilot).listed_state_files is not None)
        assert [c.info.name for c in chat(pilot).listed_state_files][:2] == ["a-fits", "b-bigger"]
        chat(pilot).load_state_file(state_folder / "a-fits.pth")
        await wait_until(pilot, lambda: session.state_file is not None)
        await wait_for_reply(pilot)
        assert threads["list"] is not ui and threads["load"] is not ui
        assert session.state_file == state_folder / "a-fits.pth"

    run_app(app_for(session), scenario)


def test_while_a_reply_runs_the_screen_shows_the_session_s_messages(make_session, app_for):
    session, spy = make_session()

    async def scenario(pilot):
        spy.hold_at(1)  # the reply waits before its first token
        chat(pilot).prompt.text = "  first line\n\n\nsecond line  "
        await pilot.press("enter")
        await wait_until(pilot, spy.held.is_set)
        await pilot.pause()
        on_screen = [(view.role, view.text) for view in chat(pilot).query(MessageView)]
        assert on_screen == [("user", "first line\nsecond line"), ("assistant", "")]  # as the session has it
        assert on_screen == [(m.role, m.text) for m in session.messages]
        spy.release()
        await wait_for_reply(pilot)

    run_app(app_for(session), scenario)


def test_new_conversation_and_system_prompt_prefill_off_the_ui_thread(make_session, app_for, monkeypatch):
    session, _ = make_session()
    threads = {}
    real_reset, real_preamble = session.reset, session.set_preamble
    monkeypatch.setattr(session, "reset", lambda: (threads.setdefault("reset", threading.current_thread()),
                                                   real_reset())[1])
    monkeypatch.setattr(session, "set_preamble", lambda text: (threads.setdefault("preamble", threading.current_thread()),
                                                               real_preamble(text))[1])

    async def scenario(pilot):
        ui = threading.current_thread()
        chat(pilot).set_persona("You are Ann.")
        chat(pilot).action_new_conversation()
        await wait_for_reply(pilot)
        assert threads["reset"] is not ui and threads["preamble"] is not ui
        assert session.preamble == "You are Ann.\n\n" and session.messages == []

    run_app(app_for(session), scenario)


def test_a_slow_new_conversation_asked_for_before_an_open_does_not_overwrite_it(make_session, app_for, tmp_path,
                                                                                   monkeypatch):
    session, _ = make_session()
    list(session.send("kept"))
    snapshot = session.save(tmp_path / "kept.rwkvchat")
    opened = [(m.role, m.text) for m in session.messages]
    session.reset()
    go = threading.Event()
    real_reset = session.reset

    def slow_reset():
        go.wait(10)
        real_reset()

    monkeypatch.setattr(session, "reset", slow_reset)

    async def scenario(pilot):
        chat(pilot).action_new_conversation()  # held until `go`
        chat(pilot).open_entry(snapshot)       # asked for second: must land last
        await pilot.pause(0.1)
        go.set()
        await wait_for_reply(pilot)
        assert [(m.role, m.text) for m in session.messages] == opened
        assert [(view.role, view.text) for view in chat(pilot).query(MessageView)] == opened

    run_app(app_for(session), scenario)
