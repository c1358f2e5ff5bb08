"""Pilot tests of the history (Ctrl+O) with a real store: every conversation kept, open, search,
rename, delete, export; full disk, read-only folder and damaged files give a message, never a
crash, and nothing is lost."""
from __future__ import annotations

import errno

import pytest
from safetensors.torch import save_file

from rwkv_chat.chat import snapshot as snapshots
from rwkv_chat.chat import store as store_module
from rwkv_chat.chat.store import ConversationStore
from rwkv_chat.testing.checkpoints import make_state_file, save_checkpoint
from rwkv_chat.tui.screens.chat import ChatScreen
from rwkv_chat.tui.screens.history import HistoryScreen, RenameDialog

from .conftest import SHAPE
from .helpers import notes, run_app, send, shown, wait_until


async def open_history(pilot) -> HistoryScreen:
    await pilot.press("ctrl+o")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.loaded)
    return pilot.app.screen


@pytest.fixture
def stored_session(make_session):
    """make() -> (session, store): a session keeping its conversations in the test's user home."""
    made = []

    def make():
        session, _ = make_session()
        store = ConversationStore()
        session.attach_store(store)
        made.append(session)
        return session, store

    yield make
    for session in made:
        session.close()


def test_open_search_rename_export_and_delete(stored_session, app_for, user_home):
    session, store = stored_session()

    async def scenario(pilot):
        await send(pilot, "about the sea", wait=True)
        first = shown(pilot)
        await pilot.press("ctrl+n")  # the first conversation is already kept
        await send(pilot, "about mountains", wait=True)
        session.wait_stored()
        history = await open_history(pilot)
        assert [e.title for e in history.entries] == ["about mountains", "about the sea"]

        await pilot.press("ctrl+f", *"SEA")
        await wait_until(pilot, lambda: [e.title for e in history.entries] == ["about the sea"])
        await pilot.press("enter")  # back to the list
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, RenameDialog))
        pilot.app.screen.query_one("#rename-input").value = ""
        await pilot.press(*"Ocean", "enter")
        await wait_until(pilot, lambda: [e.title for e in history.entries] == ["Ocean"])
        assert store.list("sea")[0].title == "Ocean"

        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: list((user_home / "exports").glob("*.md")))
        (exported,) = (user_home / "exports").glob("*.md")
        assert exported.read_text().startswith("# Ocean") and "about the sea" in exported.read_text()

        await pilot.press("enter")  # opens it; the one on screen stays kept
        await wait_until(pilot, lambda: shown(pilot) == first)
        assert session.title == "Ocean" or store.list()[0].title == "Ocean"

        history = await open_history(pilot)
        mountains = next(i for i, e in enumerate(history.entries) if e.title == "about mountains")
        history.query_one("#history-list").highlighted = mountains
        await pilot.pause()
        await pilot.press("delete")
        assert len(store.list()) == 2  # asks first
        await pilot.press("delete")
        await wait_until(pilot, lambda: [e.title for e in history.entries] == ["Ocean"])
        await pilot.press("delete")  # the open conversation cannot be deleted from under it
        await pilot.pause()
        assert len(store.list()) == 1 and "open conversation" in notes(pilot)
        await pilot.press("escape")
        assert shown(pilot) == first

    run_app(app_for(session), scenario)


def test_quit_and_new_lose_nothing(stored_session, app_for):
    session, store = stored_session()

    async def scenario(pilot):
        await send(pilot, "one", wait=True)
        await pilot.press("ctrl+n")
        await send(pilot, "two", wait=True)
        await pilot.press("ctrl+q")

    run_app(app_for(session), scenario)
    assert sorted(info.title for info in store.list()) == ["one", "two"]


def test_a_conversation_open_in_another_window_opens_here_as_a_copy(stored_session, make_session, app_for):
    other, other_store = stored_session()  # another window, with its own claims
    list(other.send("the other window's"))
    assert other.wait_stored()
    session, _ = make_session()
    session.attach_store(ConversationStore())

    async def scenario(pilot):
        history = await open_history(pilot)
        history.query_one("#history-list").highlighted = 0
        await pilot.press("enter")
        await wait_until(pilot, lambda: "opened here as a copy" in notes(pilot))
        assert session.conversation_id != other.conversation_id and len(shown(pilot)) == 2
        await send(pilot, "mine", wait=True)
        session.wait_stored()
        titles = {i.title: i.n_messages for i in other_store.list()}
        assert titles == {"the other window's": 2, "the other window's (copy)": 4}

    run_app(app_for(session), scenario)


def test_a_full_disk_is_a_message_and_nothing_is_lost(stored_session, app_for, monkeypatch):
    session, store = stored_session()

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario(pilot):
        await send(pilot, "kept in memory", wait=True)
        session.wait_stored()
        monkeypatch.setattr(snapshots, "save_file", full)
        await send(pilot, "second", wait=True)
        await wait_until(pilot, lambda: "disk is full" in notes(pilot))
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: notes(pilot).count("disk is full") >= 2)
        assert [m.text for m in session.messages][::2] == ["kept in memory", "second"]
        assert len(shown(pilot)) == 4 and isinstance(pilot.app.screen, ChatScreen)
        assert store.list()[0].n_messages == 2  # the last stored copy is intact

    run_app(app_for(session), scenario)


def test_a_read_only_folder_is_a_message_and_the_chat_goes_on(make_session, app_for, monkeypatch):
    def refuse(folder):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store_module, "_check_writable", refuse)
    session, _ = make_session()
    session.attach_store(ConversationStore())

    async def scenario(pilot):
        await wait_until(pilot, lambda: "Read-only file system" in notes(pilot))
        await send(pilot, "still works", wait=True)
        await wait_until(pilot, lambda: "cannot be written" in notes(pilot))
        assert len(shown(pilot)) == 2
        history = await open_history(pilot)
        assert history.entries == []

    run_app(app_for(session), scenario)
    session.close()


def test_damaged_files_are_listed_with_the_reason_and_can_be_deleted(stored_session, app_for, user_home):
    folder = user_home / "snapshots"
    folder.mkdir(parents=True)
    (folder / "garbage.rwkvchat").write_bytes(b"not a snapshot at all")
    save_file({}, str(folder / "deep.rwkvchat"), metadata={snapshots.METADATA_KEY: "[" * 50000 + "]" * 50000})
    save_file({}, str(folder / "infinity.rwkvchat"), metadata={snapshots.METADATA_KEY: (
        '{"format": "rwkv-chat-snapshot", "format_version": 1, "messages": [], "settings": {}, "tokens": 0, '
        '"model": {"shape": {"version": "7", "n_layer": Infinity, "n_embd": 64}}}')})
    (user_home / "conversations").mkdir(parents=True)
    (user_home / "conversations" / "1234.5.rwkvchat").write_bytes(b"\x00" * 40)
    session, _ = stored_session()

    async def scenario(pilot):
        history = await open_history(pilot)
        unreadable = {e.name: e.problem for e in history.entries if e.problem}
        assert set(unreadable) == {"garbage.rwkvchat", "deep.rwkvchat", "infinity.rwkvchat", "1234"}
        assert "nested too deeply" in unreadable["deep.rwkvchat"]
        await pilot.press("enter")  # cannot be opened: a message, the dialog stays
        await wait_until(pilot, lambda: "Del deletes it" in notes(pilot))
        assert isinstance(pilot.app.screen, HistoryScreen)
        for _ in range(4):
            count = len(history.entries)
            await pilot.press("delete", "delete")
            await wait_until(pilot, lambda: len(history.entries) < count or not history.entries)
            await pilot.pause()
        assert history.entries == [] and not list(folder.iterdir())
        assert not list((user_home / "conversations").glob("*.rwkvchat"))

    run_app(app_for(session), scenario)


def test_new_conversation_after_its_state_file_was_deleted_is_a_message(stored_session, app_for, tmp_path):
    session, _ = stored_session()
    state = tmp_path / "gone.pth"
    save_checkpoint(state, make_state_file("7", *SHAPE, seed=3))
    session.load_state_file(state)
    list(session.send("from a state"))
    snapshot = session.save(tmp_path / "chat.rwkvchat")
    session.reset()
    state.unlink()

    async def scenario(pilot):
        pilot.app.screen_stack[0].open_entry(snapshot)
        await wait_until(pilot, lambda: len(shown(pilot)) == 2)
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: "Could not start" in "".join(str(n.title) for n in pilot.app._notifications))
        assert len(shown(pilot)) == 2 and isinstance(pilot.app.screen, ChatScreen)

    run_app(app_for(session), scenario)


def test_a_message_unanswered_when_the_app_was_killed_comes_back_in_the_box(stored_session, app_for, user_home):
    import subprocess
    import sys

    from rwkv_chat.chat import drafts

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = drafts.folder()
    folder.mkdir(parents=True)
    (folder / f"{int(gone.stdout)}.txt").write_text("the question I typed before the kill", encoding="utf-8")
    session, store = stored_session()

    async def scenario(pilot):
        prompt = pilot.app.screen_stack[0].prompt
        assert prompt.text == "the question I typed before the kill"
        assert "back in the message box" in notes(pilot)
        assert list(folder.iterdir()) == []  # taken back: a second start does not show it again

        await send(pilot, "a new question", wait=True)
        await wait_until(pilot, lambda: list(folder.iterdir()) == [])  # kept from Enter until its reply is stored
        assert store.messages(session.conversation_id)[0]["text"] == "a new question"

    run_app(app_for(session), scenario)


def test_unanswered_messages_of_running_instances_are_left_alone(user_home):
    import os

    from rwkv_chat.chat import drafts

    drafts.keep("mine, still being answered")
    assert (drafts.folder() / f"{os.getpid()}.txt").exists()
    assert drafts.recover() == []
    drafts.clear("an older message")  # a newer message stays
    assert drafts.recover() == [] and (drafts.folder() / f"{os.getpid()}.txt").exists()
    drafts.clear("mine, still being answered")
    assert list(drafts.folder().iterdir()) == []


def test_a_listing_that_fails_unexpectedly_says_so(stored_session, app_for, monkeypatch):
    from rwkv_chat.tui.screens import history

    def broken(*args, **kwargs):
        raise KeyError("model_label")

    monkeypatch.setattr(history, "load_entries", broken)
    session, _ = stored_session()

    async def scenario(pilot):
        screen = await open_history(pilot)
        assert screen.entries == []
        assert "unexpected KeyError" in str(screen.query_one("#history-empty").render())

    run_app(app_for(session), scenario)
