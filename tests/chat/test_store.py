"""The conversation history: every change stored, exact resumes, crash recovery, two processes at
once, full disk, read-only folder, damaged files listed and deletable."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rwkv_chat
from rwkv_chat import files as files_module
from rwkv_chat.chat import snapshot as snapshots
from rwkv_chat.chat import store as store_module
from rwkv_chat.chat.session import ChatSession
from rwkv_chat.chat.store import ConversationStore
from rwkv_chat.errors import StoreError
from rwkv_chat.sampling import SamplingSettings

from .conftest import run_killed_during_save

GREEDY = SamplingSettings(temperature=0, presence=0, frequency=0, max_tokens=3)
REPO_ROOT = Path(rwkv_chat.__file__).resolve().parents[1]


@pytest.fixture
def store(chat_home) -> ConversationStore:
    store = ConversationStore()
    yield store
    store.close()


def stored_session(pipe, store, *messages: str) -> ChatSession:
    session = ChatSession(pipe, GREEDY)
    session.attach_store(store)
    for text in messages:
        list(session.send(text))
    assert session.wait_stored(30)
    return session


def revision_files(store, conversation_id):
    return sorted(p.name for p in store.folder.glob(f"{conversation_id}.*.rwkvchat"))


def test_every_reply_edit_regenerate_and_setting_is_stored_and_resumes_exactly(pipe, store, assert_same_state):
    session = stored_session(pipe, store, "hello", "tell me more")
    assert [(i.title, i.n_messages) for i in store.list()] == [("hello", 4)]

    list(session.regenerate())
    session.wait_stored()
    list(session.edit_last("tell me less"))
    session.wait_stored()
    session.settings = session.settings.replace(top_k=5)
    session.wait_stored()
    assert store.messages(session.conversation_id)[2]["text"] == "tell me less"

    resumed = ChatSession.from_store(pipe, store, session.conversation_id)
    assert resumed.messages == session.messages and resumed.settings.top_k == 5
    assert_same_state(resumed.state, session.state)
    for s in (session, resumed):  # the resumed one goes on exactly like the original
        list(s.regenerate())
    assert resumed.messages[-1].text == session.messages[-1].text
    assert resumed.wait_stored() and session.wait_stored()
    assert len(revision_files(store, session.conversation_id)) == 2  # newest and the one before
    resumed.close()
    session.close()


def test_a_stopped_reply_is_stored_and_an_empty_conversation_is_not(pipe, store):
    session = ChatSession(pipe, GREEDY.replace(max_tokens=50))
    session.attach_store(store)
    assert store.list() == []
    reply = session.send("hi")
    next(reply)
    reply.close()
    session.wait_stored()
    (info,) = store.list()
    assert info.n_messages == 2 and store.messages(info.id)[1]["finish_reason"] == "cancelled"
    session.reset()  # a new conversation under a new id; the old one stays
    list(session.send("second"))
    session.wait_stored()
    assert [i.title for i in store.list()] == ["second", "hi"]
    session.close()


def test_rename_search_delete_and_markdown(pipe, store):
    first = stored_session(pipe, store, "about the sea")
    second = stored_session(pipe, store, "about mountains")
    store.rename(first.conversation_id, "  Ocean   talk ")
    list(first.send("more"))  # the user's title survives later stores
    first.wait_stored()
    assert {i.title for i in store.list()} == {"Ocean talk", "about mountains"}
    assert [i.id for i in store.list("MOUNTAIN")] == [second.conversation_id]
    assert [i.id for i in store.list("ocean")] == [first.conversation_id]
    markdown = store.markdown(first.conversation_id)
    assert markdown.startswith("# Ocean talk") and "**User:**\n\nabout the sea" in markdown
    store.delete(second.conversation_id)
    assert [i.id for i in store.list()] == [first.conversation_id]
    assert revision_files(store, second.conversation_id) == []
    with pytest.raises(StoreError, match="no conversation"):
        store.load(second.conversation_id)
    first.close()
    second.close()


def test_export_and_import_a_single_snapshot_file(pipe, store, tmp_path, assert_same_state):
    session = stored_session(pipe, store, "share me")
    path = store.export_snapshot(session.conversation_id, tmp_path / "shared.rwkvchat")
    again = store.export_snapshot(session.conversation_id, tmp_path / "shared.rwkvchat")
    assert again.name == "shared-2.rwkvchat"  # never overwrites
    opened = ChatSession.open(pipe, path)
    assert opened.messages == session.messages
    new_id = store.import_snapshot(path)
    assert new_id != session.conversation_id and len(store.list()) == 2
    assert_same_state(ChatSession.from_store(pipe, store, new_id).state, session.state)
    session.close()


# ------------------------------------------------------------------ crashes and damage
def test_a_missing_newest_revision_falls_back_to_the_previous_one(pipe, store):
    session = stored_session(pipe, store, "one", "two")
    newest, older = sorted(store.folder.glob(f"{session.conversation_id}.*.rwkvchat"), reverse=True)
    newest.unlink()
    assert store.list()[0].readable
    resumed = ChatSession.from_store(pipe, store, session.conversation_id)
    assert [m.text for m in resumed.messages] == [m.text for m in session.messages[:2]]
    older.unlink()
    (info,) = store.list()
    assert not info.readable and "missing" in info.problem
    with pytest.raises(StoreError, match="cannot be opened"):
        store.load(info.id)
    store.delete(info.id)
    assert store.list() == []
    session.close()


def test_a_file_the_index_does_not_know_is_adopted_and_unreadable_ones_are_listed(pipe, store, chat_home):
    session = stored_session(pipe, store, "kept in a file only")
    folder = store.folder
    store.close()
    conn = sqlite3.connect(folder / "index.sqlite3")
    conn.execute("DELETE FROM conversations")  # as if killed between writing the file and the index
    conn.commit()
    conn.close()
    (folder / "0000-broken.5.rwkvchat").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    nested = {"format": "rwkv-chat-snapshot", "format_version": 1, "messages": [], "settings": {}, "tokens": 0,
              "model": {"shape": {"version": "7", "n_layer": float("inf")}}}
    snapshots.write_snapshot(folder / "0001-infinity.7.rwkvchat", nested, {})
    text = json.dumps(nested).replace("Infinity", "1e999")
    (folder / "0002-deep.3.rwkvchat").write_bytes(b"")
    from safetensors.torch import save_file
    save_file({}, str(folder / "0002-deep.3.rwkvchat"), metadata={snapshots.METADATA_KEY: "[" * 100000 + "]" * 100000})
    save_file({}, str(folder / "0003-inf.3.rwkvchat"), metadata={snapshots.METADATA_KEY: text})

    reopened = ConversationStore()
    infos = reopened.list()
    readable = [i for i in infos if i.readable]
    assert [i.title for i in readable] == ["kept in a file only"]
    unreadable = {i.id: i.problem for i in infos if not i.readable}
    assert set(unreadable) == {"0000-broken", "0001-infinity", "0002-deep", "0003-inf"}
    assert "nested too deeply" in unreadable["0002-deep"]
    assert all(unreadable.values())
    for conversation_id in unreadable:
        reopened.delete(conversation_id)
    assert [i.id for i in reopened.list()] == [session.conversation_id]
    assert not list(folder.glob("000*"))
    reopened.close()
    session.close()


def test_a_damaged_index_is_set_aside_and_rebuilt_from_the_files(pipe, store):
    session = stored_session(pipe, store, "survive this")
    store.rename(session.conversation_id, "ignored after the rebuild")
    store.close()
    for path in store.folder.glob("index.sqlite3*"):
        path.unlink()
    (store.folder / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    rebuilt = ConversationStore()
    assert "rebuilt" in rebuilt.problem
    assert [(i.id, i.title, i.n_messages) for i in rebuilt.list()] == [(session.conversation_id, "survive this", 2)]
    assert list(rebuilt.folder.glob("index.sqlite3.damaged-*"))
    rebuilt.close()
    session.close()


def test_a_killed_store_leaves_the_last_copy_and_its_temp_file_is_cleaned_up(pipe, store, chat_home):
    session = stored_session(pipe, store, "before the kill")
    env = {**os.environ, "RWKV_CHAT_HOME": str(chat_home)}
    call = f"ConversationStore().save({session.conversation_id!r}, {{'messages': []}}, {{}})"
    result = run_killed_during_save(call, env)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    temps = [p for p in store.folder.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1
    reopened = ConversationStore()  # the writer is dead: its temp file goes
    assert [p for p in store.folder.iterdir() if p.name.endswith(".tmp")] == []
    assert ChatSession.from_store(pipe, reopened, session.conversation_id).messages == session.messages
    session.close()


def test_temp_files_of_running_processes_are_kept(tmp_path):
    mine = tmp_path / f".x.rwkvchat.{os.getpid()}.abc.tmp"
    dead = tmp_path / ".x.rwkvchat.999999999.abc.tmp"
    other = tmp_path / "notes.tmp"
    old_style, recent_old_style = tmp_path / ".y.rwkvchat.k2j_x8.tmp", tmp_path / ".z.rwkvchat.q1w2e3.tmp"
    for path in (mine, dead, other, old_style, recent_old_style):
        path.write_bytes(b"x")
    os.utime(old_style, (1e9, 1e9))  # 2001: no save is still writing it
    assert sorted(files_module.remove_stale_temp_files(tmp_path)) == sorted([dead, old_style])
    assert mine.exists() and other.exists() and recent_old_style.exists()


# ------------------------------------------------------------------ disk full, read-only
def test_a_full_disk_reports_and_keeps_the_last_stored_copy(pipe, store, monkeypatch):
    session = stored_session(pipe, store, "first")
    before = store.messages(session.conversation_id)
    errors = []
    session.on_store_error = errors.append

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshots, "save_file", full)
    list(session.send("second"))
    session.wait_stored()
    assert errors and "disk is full" in errors[0] and session.store_error == errors[0]
    assert len(session.messages) == 4  # nothing lost in memory
    assert store.messages(session.conversation_id) == before
    assert not [p for p in store.folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    session.settings = session.settings.replace(top_k=3)  # the next change stores everything
    session.wait_stored()
    assert session.store_error is None and len(store.messages(session.conversation_id)) == 4
    session.close()


def test_a_read_only_folder_opens_read_only_with_a_reason(pipe, store, monkeypatch):
    session = stored_session(pipe, store, "readable later")
    session.close()
    store.close()

    def refuse(folder):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store_module, "_check_writable", refuse)
    read_only = ConversationStore()
    assert read_only.read_only and "Read-only file system" in read_only.problem
    assert [i.title for i in read_only.list()] == ["readable later"]
    assert ChatSession.from_store(pipe, read_only, session.conversation_id).messages == session.messages
    with pytest.raises(StoreError, match="cannot be written"):
        read_only.rename(session.conversation_id, "new")
    other = ChatSession(pipe, GREEDY)
    other.attach_store(read_only)
    list(other.send("not kept"))
    other.wait_stored()
    assert "cannot be written" in other.store_error and len(other.messages) == 2
    other.close()


# ------------------------------------------------------------------ two processes
def test_two_processes_chatting_at_once_keep_both_conversations(chat_home, make_model_file):
    model = make_model_file("7", n_layer=1, n_embd=64)
    script = textwrap.dedent(f"""
        import sys
        from rwkv_chat import RWKV, Pipeline
        from rwkv_chat.chat.session import ChatSession
        from rwkv_chat.chat.store import ConversationStore
        from rwkv_chat.sampling import SamplingSettings

        session = ChatSession(Pipeline(RWKV({str(model)!r}, progress=None)), SamplingSettings(max_tokens=2))
        session.attach_store(ConversationStore())
        for turn in range(6):
            list(session.send(f"{{sys.argv[1]}} turn {{turn}}"))
            session.save()  # Ctrl+S at the same time too
        session.close()
        print(session.conversation_id)
    """)
    env = {**os.environ, "RWKV_CHAT_HOME": str(chat_home)}
    runs = [subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=REPO_ROOT, env=env) for name in ("alpha", "beta")]
    ids = []
    for run in runs:
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err.decode()[-2000:]
        ids.append(out.decode().split()[-1])
    store = ConversationStore()
    infos = {i.id: i for i in store.list()}
    assert set(infos) == set(ids)
    assert {infos[i].title for i in ids} == {"alpha turn 0", "beta turn 0"}
    assert all(infos[i].n_messages == 12 for i in ids)
    snapshot_files = list((chat_home / "snapshots").glob("*.rwkvchat"))
    assert len(snapshot_files) == 2  # one file per conversation, neither overwrote the other
    assert {snapshots.read_snapshot_data(p)["messages"][0]["text"] for p in snapshot_files} == {
        "alpha turn 0", "beta turn 0"}
    store.close()


def test_a_conversation_open_in_another_window_opens_as_a_copy_and_both_are_kept(pipe, store):
    first = stored_session(pipe, store, "shared start")
    other_store = ConversationStore()  # another window: its own claims
    second = ChatSession.from_store(pipe, other_store, first.conversation_id)
    assert second.conversation_id != first.conversation_id
    assert second.title == "shared start (copy)" and "open in another rwkv-chat window" in second.notice
    assert [m.text for m in second.messages] == [m.text for m in first.messages]
    list(first.send("A from one"))
    list(second.send("B from two"))
    assert first.wait_stored() and second.wait_stored()
    with pytest.raises(StoreError, match="open in another rwkv-chat window"):
        other_store.delete(first.conversation_id)
    texts = {i.id: [m["text"] for m in store.messages(i.id)] for i in store.list()}
    assert texts[first.conversation_id][::2] == ["shared start", "A from one"]
    assert texts[second.conversation_id][::2] == ["shared start", "B from two"]
    assert {i.title for i in store.list()} == {"shared start", "shared start (copy)"}
    first.close()
    other_store.delete(first.conversation_id)  # closed there: deletable now
    assert [i.id for i in store.list()] == [second.conversation_id]
    assert not list(store.folder.glob(f".{first.conversation_id}*"))
    second.close()
    other_store.close()


def test_a_save_after_another_writer_stored_the_conversation_goes_to_a_copy(pipe, store, monkeypatch):
    # a file system without locks: both sessions get the conversation; the index's revision check remains
    monkeypatch.setattr(ConversationStore, "claim", lambda self, conversation_id: True)
    first = stored_session(pipe, store, "start")
    second = ChatSession.from_store(pipe, ConversationStore(), first.conversation_id)
    assert second.conversation_id == first.conversation_id
    notices = []
    second.on_store_notice = notices.append
    list(first.send("A from one"))
    assert first.wait_stored()
    list(second.send("B from two"))
    assert second.wait_stored() and second.store_error is None
    assert len(notices) == 1 and "changed in another rwkv-chat window" in notices[0]
    assert second.conversation_id != first.conversation_id and second.title == "start (copy)"
    list(second.send("more from two"))  # goes on in the copy
    assert second.wait_stored()
    texts = {i.id: [m["text"] for m in store.messages(i.id)] for i in store.list()}
    assert texts == {first.conversation_id: ["start", texts[first.conversation_id][1], "A from one",
                                             texts[first.conversation_id][3]],
                     second.conversation_id: ["start", texts[second.conversation_id][1], "B from two",
                                              texts[second.conversation_id][3], "more from two",
                                              texts[second.conversation_id][5]]}
    assert len(notices) == 1
    first.close()
    second.close()


def test_two_processes_on_one_conversation_lose_nothing(chat_home, make_model_file):
    """The same conversation continued in two processes (rwkv-chat -c twice): the second works on a
    copy, the history cannot delete it while the first has it open, and every message is kept."""
    model = make_model_file("7", n_layer=1, n_embd=64)
    common = f"""
        import sys
        from rwkv_chat import RWKV, Pipeline
        from rwkv_chat.chat.session import ChatSession
        from rwkv_chat.chat.store import ConversationStore
        from rwkv_chat.sampling import SamplingSettings
        pipe = Pipeline(RWKV({str(model)!r}, progress=None))
        store = ConversationStore()
    """
    env = {**os.environ, "RWKV_CHAT_HOME": str(chat_home)}
    program = lambda script: textwrap.dedent(common) + textwrap.dedent(script)
    run = lambda script, *args: subprocess.run([sys.executable, "-c", program(script), *args], cwd=REPO_ROOT, env=env,
                                               capture_output=True, text=True, timeout=240)
    started = run("""
        session = ChatSession(pipe, SamplingSettings(max_tokens=2))
        session.attach_store(store)
        list(session.send("start"))
        session.close()
        print(session.conversation_id)
    """)
    assert started.returncode == 0, started.stderr[-2000:]
    conversation_id = started.stdout.split()[-1]
    holder = subprocess.Popen([sys.executable, "-c", program("""
        session = ChatSession.from_store(pipe, store, sys.argv[1])
        print(session.conversation_id, flush=True)
        sys.stdin.readline()
        list(session.send("A from one"))
        session.close()
    """), conversation_id], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().split() == [conversation_id]
        second = run("""
            session = ChatSession.from_store(pipe, store, sys.argv[1])
            list(session.send("B from two"))
            session.close()
            print(session.conversation_id, session.notice)
        """, conversation_id)
        assert second.returncode == 0, second.stderr[-2000:]
        copy_id = second.stdout.split()[0]
        assert copy_id != conversation_id and "open in another rwkv-chat window" in second.stdout
        deleted = subprocess.run([sys.executable, "-m", "rwkv_chat.cli", "history", "delete", conversation_id[:8]],
                                 cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert deleted.returncode != 0 and "open in another rwkv-chat window" in deleted.stderr
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(240) == 0
    finally:
        holder.kill()
    store = ConversationStore()
    texts = {i.id: [m["text"] for m in store.messages(i.id)][::2] for i in store.list()}
    assert texts == {conversation_id: ["start", "A from one"], copy_id: ["start", "B from two"]}
    store.close()


def test_the_history_folder_and_index_are_private(chat_home):
    store = ConversationStore()
    assert store.folder.stat().st_mode & 0o777 == 0o700
    assert store.index_path.stat().st_mode & 0o777 == 0o600
    store.close()
    os.chmod(store.index_path, 0o644)  # made by an older version
    ConversationStore().close()
    assert store.index_path.stat().st_mode & 0o777 == 0o600


def test_write_new_file_never_replaces_a_file(tmp_path):
    target = tmp_path / "chat.rwkvchat"
    written = [files_module.write_new_file(target, lambda temp, n=n: temp.write_text(str(n))) for n in range(3)]
    assert [p.name for p in written] == ["chat.rwkvchat", "chat-2.rwkvchat", "chat-3.rwkvchat"]
    assert [p.read_text() for p in written] == ["0", "1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temp files left


def test_an_index_that_cannot_be_written_opens_read_only_and_is_not_set_aside(pipe, store, monkeypatch):
    session = stored_session(pipe, store, "still listed")
    session.close()
    store.close()
    original = ConversationStore._open_db

    def full(self):
        if not self.read_only:
            raise sqlite3.OperationalError("database or disk is full")
        return original(self)

    monkeypatch.setattr(ConversationStore, "_open_db", full)
    reopened = ConversationStore()
    assert reopened.read_only and "disk is full" in reopened.problem
    assert not list(reopened.folder.glob("*.damaged-*"))
    assert [i.title for i in reopened.list()] == ["still listed"]
    with pytest.raises(StoreError, match="disk is full"):
        reopened.save("x", {"messages": []}, {})


def test_a_read_only_file_system_still_lists_and_opens_what_was_kept(pipe, chat_home, mount_tmpfs, monkeypatch):
    """A WAL index cannot be opened with mode=ro where no -shm file can be made; it must still be read."""
    home = mount_tmpfs("size=4m")
    monkeypatch.setenv("RWKV_CHAT_HOME", str(home))
    writable = ConversationStore()
    session = stored_session(pipe, writable, "kept before the remount")
    session.close()
    writable.close()
    subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)

    read_only = ConversationStore()
    assert read_only.read_only
    assert [i.title for i in read_only.list()] == ["kept before the remount"]
    assert read_only.most_recent().id == session.conversation_id
    assert ChatSession.from_store(pipe, read_only, session.conversation_id).messages == session.messages
    read_only.close()
