"""Snapshots: exact round trips (v4 and v7), atomic writes, refusals that leave the session alone."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rwkv_chat.chat import ChatSession, list_snapshots
from rwkv_chat.chat import snapshot as snapshots
from rwkv_chat.errors import SnapshotError, StateMismatchError
from rwkv_chat.sampling import SamplingSettings

from .conftest import run_killed_during_save

GREEDY = SamplingSettings(temperature=0, presence=0, frequency=0, max_tokens=3)
WIDE = (2, 128)


def conversation(pipe, *messages: str, **options) -> ChatSession:
    session = ChatSession(pipe, GREEDY, **options)
    for text in messages:
        list(session.send(text))
    return session


def session_view(session: ChatSession):
    """What must not change when a restore is refused."""
    return ([(m.role, m.text, m.finish_reason, m.stats) for m in session.messages], session.state,
            session.settings, session.state_file, session.snapshot_path)


@pytest.mark.parametrize("version", ["4", "7"])
def test_round_trip_continues_exactly_like_the_uninterrupted_session(make_pipeline, version, tmp_path,
                                                                     assert_same_state):
    pipe = make_pipeline(version)
    original = conversation(pipe, "hi", "tell me more", user="Ann", assistant="Bot", preamble="Be brief.")
    original.settings = original.settings.replace(top_k=7, stop=("xyz",))
    path = original.save(tmp_path / "chat.rwkvchat")

    restored = ChatSession.open(pipe, path)

    assert restored.messages == original.messages
    assert restored.settings == original.settings
    assert (restored.user, restored.assistant, restored.preamble) == ("Ann", "Bot", "Be brief.\n\n")
    assert restored.snapshot_path == path
    assert_same_state(restored.state, original.state)

    for session in (original, restored):
        list(session.send("and then?"))
    assert [m.text for m in restored.messages] == [m.text for m in original.messages]
    assert_same_state(restored.state, original.state)  # identical next logits and state


def test_regenerate_and_continue_work_after_a_restore(pipe, tmp_path, assert_same_state):
    original = conversation(pipe, "hi", "again")
    path = original.save(tmp_path / "chat.rwkvchat")
    restored = ChatSession.open(pipe, path)

    for session in (original, restored):
        list(session.regenerate())
        list(session.continue_reply())
    assert restored.messages[-1].text == original.messages[-1].text
    assert_same_state(restored.state, original.state)


def test_restore_replaces_the_conversation_and_reset_goes_back_to_its_start(pipe, tmp_path, assert_same_state):
    saved = conversation(pipe, "hi", preamble="Be brief.")
    path = saved.save(tmp_path / "chat.rwkvchat")
    session = conversation(pipe, "something else", "and more")

    session.restore(path)
    assert [m.text for m in session.messages] == [m.text for m in saved.messages]
    session.reset()
    assert session.messages == []
    assert_same_state(session.state, pipe.prefill("Be brief.\n\n"))


def test_saving_without_a_path_uses_the_snapshots_folder_and_then_the_same_file(pipe, chat_home):
    session = conversation(pipe, "hi")
    first = session.save()
    assert first.parent == chat_home / "snapshots" and first.suffix == ".rwkvchat"
    list(session.send("more"))
    assert session.save() == first
    session.reset()
    assert session.save() != first  # a new conversation gets a new file


def test_list_snapshots_newest_first_skipping_damaged_files(pipe, chat_home):
    older = conversation(pipe, "first conversation")
    older_path = older.save()
    newer = conversation(pipe, "second conversation", "its follow-up")
    newer_path = newer.save()
    (chat_home / "snapshots" / "broken.rwkvchat").write_bytes(b"not a snapshot")

    infos = list_snapshots()

    assert [info.path for info in infos] == [newer_path, older_path]
    assert infos[0].first_message == "second conversation"
    assert infos[0].n_messages == 4
    assert infos[0].model_name == pipe.model.path.name
    assert infos[0].saved_at >= infos[1].saved_at
    assert list_snapshots(chat_home / "nowhere") == []


def test_the_file_is_safetensors_with_the_conversation_as_json_metadata(pipe, tmp_path):
    path = conversation(pipe, "hi").save(tmp_path / "chat.rwkvchat")
    data = snapshots.read_snapshot_data(path)
    assert data["format"] == "rwkv-chat-snapshot" and data["format_version"] == 1
    assert data["model"]["shape"] == pipe.model.shape.to_dict()
    assert data["model"]["fingerprint"] == pipe.model.fingerprint
    assert data["tokens"] == len(pipe.encode("User: hi\n\nAssistant:")) + 3
    assert set(snapshots.read_snapshot(path).states) == {"", "turn_start"}


# ------------------------------------------------------------------ atomic writes
def test_a_save_that_fails_midway_leaves_the_previous_snapshot_intact(pipe, tmp_path, monkeypatch):
    session = conversation(pipe, "hi")
    path = session.save(tmp_path / "chat.rwkvchat")
    before = path.read_bytes()
    list(session.send("more"))

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(snapshots, "save_file", write_half_then_fail)
    with pytest.raises(SnapshotError, match="disk full"):
        session.save()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.rwkvchat"]  # no temp file left behind
    assert len(snapshots.read_snapshot_data(path)["messages"]) == 2


def test_a_save_killed_midway_leaves_the_previous_snapshot_intact(pipe, tmp_path):
    path = conversation(pipe, "hi").save(tmp_path / "chat.rwkvchat")
    before = path.read_bytes()
    result = run_killed_during_save(
        f"snapshot.write_snapshot({str(path)!r}, {{'messages': []}}, {{'': {{'x': torch.zeros(4)}}}})")

    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert path.read_bytes() == before
    assert [info.path for info in list_snapshots(tmp_path)] == [path]  # the stray temp file is not listed


# ------------------------------------------------------------------ refusals
def test_a_snapshot_from_another_model_shape_is_refused(make_pipeline, tmp_path):
    narrow, wide = make_pipeline("7"), make_pipeline("7", WIDE)
    path = conversation(narrow, "hi").save(tmp_path / "narrow.rwkvchat")
    session = conversation(wide, "hello")
    before = session_view(session)

    with pytest.raises(StateMismatchError) as refused:
        session.restore(path)

    message = str(refused.value)
    assert narrow.model.shape.describe() in message and wide.model.shape.describe() in message
    assert session_view(session) == before
    with pytest.raises(StateMismatchError):
        ChatSession.open(wide, path)


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no metadata":
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        document = snapshots.read_snapshot_data(path)
        tensors = snapshots.read_snapshot(path).states
        flat = {snapshots._tensor_name(name, key): t for name, state in tensors.items() for key, t in state.items()}
        if how == "bad json":
            metadata = {snapshots.METADATA_KEY: "{not json"}
        elif how == "newer format":
            metadata = {snapshots.METADATA_KEY: json.dumps({**document, "format_version": 99})}
        elif how == "missing messages":
            metadata = {snapshots.METADATA_KEY: json.dumps({k: v for k, v in document.items() if k != "messages"})}
        elif how == "bad message":
            metadata = {snapshots.METADATA_KEY: json.dumps({**document, "messages": [{"role": "robot"}]})}
        elif how == "missing state":
            metadata = {snapshots.METADATA_KEY: json.dumps(document)}
            flat = {k: v for k, v in flat.items() if k != "layer.1.1"}
        else:
            raise AssertionError(how)
        save_file(flat, str(path), metadata=metadata)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "no metadata", "bad json", "newer format",
                                 "missing messages", "bad message", "missing state"])
def test_a_damaged_snapshot_is_refused_and_the_session_is_unchanged(pipe, tmp_path, how):
    path = conversation(pipe, "hi").save(tmp_path / f"{how}.rwkvchat")
    damage(path, how)
    session = conversation(pipe, "hello")
    before = session_view(session)

    with pytest.raises(SnapshotError) as refused:
        session.restore(path)

    assert str(path) in str(refused.value)
    assert session_view(session) == before
    if how == "newer format":
        assert "newer" in str(refused.value)


def test_a_missing_snapshot_is_refused(pipe, tmp_path):
    with pytest.raises(SnapshotError, match="no such snapshot"):
        ChatSession.open(pipe, tmp_path / "absent.rwkvchat")


def test_older_format_versions_are_upgraded_when_read(pipe, tmp_path, monkeypatch):
    path = conversation(pipe, "hi").save(tmp_path / "chat.rwkvchat")
    monkeypatch.setattr(snapshots, "FORMAT_VERSION", 2)
    monkeypatch.setitem(snapshots._UPGRADES, 1, lambda data: {**data, "format_version": 2, "upgraded": True})
    data = snapshots.read_snapshot_data(path)
    assert data["format_version"] == 2 and data["upgraded"] is True


def test_a_saved_conversation_names_its_model_by_absolute_path(make_model_file, tmp_path, monkeypatch):
    """Started with `-m model.pth` in the model's folder, resumed (`-c`) from anywhere."""
    from rwkv_chat import RWKV, Pipeline
    from rwkv_chat.cli import snapshot_model_path

    model_file = make_model_file("7", n_layer=1, n_embd=64)
    monkeypatch.chdir(model_file.parent)
    session = ChatSession(Pipeline(RWKV(model_file.name, progress=None)), SamplingSettings(max_tokens=2))
    list(session.send("hi"))
    saved = session.save(tmp_path / "relative.rwkvchat")
    monkeypatch.chdir(tmp_path)
    assert snapshot_model_path(saved) == model_file
