"""Snapshot files are validated completely before a session uses them: JSON size, depth and
constants, every field's type, consistency, and every tensor's dtype, shape and finiteness.
Each problem is a SnapshotError naming the file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rwkv_chat.chat import ChatSession
from rwkv_chat.chat import snapshot as snapshots
from rwkv_chat.errors import SnapshotError
from rwkv_chat.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0, presence=0, frequency=0, max_tokens=2)


@pytest.fixture
def saved(make_pipeline, tmp_path):
    """(pipeline, JSON document, tensors) of a real saved two-turn conversation."""
    pipe = make_pipeline("7")
    session = ChatSession(pipe, GREEDY)
    list(session.send("Hi"))
    path = session.save(tmp_path / f"good{snapshots.SUFFIX}")
    file = snapshots.read_snapshot(path)
    tensors = {snapshots._tensor_name(name, key): t for name, state in file.states.items() for key, t in state.items()}
    return pipe, file.data, tensors


def write(tmp_path, document, tensors, text=None):
    path = tmp_path / f"case{snapshots.SUFFIX}"
    text = json.dumps(document) if text is None else text
    save_file(tensors, str(path), metadata={snapshots.METADATA_KEY: text})
    return path


def refused(pipe, path) -> str:
    with pytest.raises(SnapshotError) as info:
        ChatSession.open(pipe, path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_the_unchanged_snapshot_opens(saved, tmp_path):
    pipe, data, tensors = saved
    session = ChatSession.open(pipe, write(tmp_path, data, tensors))
    assert [m.text for m in session.messages][0] == "Hi"


TENSOR_CASES = {
    "int32 state": ("layer.0.1", lambda t: t.to(torch.int32), "int32"),
    "half-size logits": ("logits", lambda t: t[: t.numel() // 2].contiguous(), "logits has shape"),
    "2-D logits": ("logits", lambda t: t.reshape(1, -1).contiguous(), "logits has shape"),
    "NaN in a state": ("layer.1.1", lambda t: t.clone().fill_(float("nan")), "NaN or infinite"),
    "inf in the logits": ("logits", lambda t: torch.full_like(t, float("inf")), "NaN or infinite"),
    "NaN in the turn-start state": ("turn_start.layer.0.0", lambda t: t.clone().fill_(float("nan")),
                                    "'turn_start' state is damaged"),
    "wrong heads": ("layer.0.1", lambda t: torch.zeros(4, 16, 16), "shape [4, 16, 16]"),
}


@pytest.mark.parametrize("name", TENSOR_CASES)
def test_damaged_tensors_are_refused(saved, tmp_path, name):
    pipe, data, tensors = saved
    key, change, message = TENSOR_CASES[name]
    tensors = dict(tensors, **{key: change(tensors[key])})
    assert message in refused(pipe, write(tmp_path, data, tensors))


def test_missing_and_extra_states_are_refused(saved, tmp_path):
    pipe, data, tensors = saved
    without_turn = {k: v for k, v in tensors.items() if not k.startswith("turn_start.")}
    assert "'turn_start' state is missing" in refused(pipe, write(tmp_path, data, without_turn))
    extra = dict(tensors, **{"other.layer.0.0": torch.zeros(3)})
    assert "unexpected saved state(s) ['other']" in refused(pipe, write(tmp_path, data, extra))
    lacking = {k: v for k, v in tensors.items() if k != "layer.1.2"}
    assert "lacks layer.1.2" in refused(pipe, write(tmp_path, data, lacking))


def _changed(data, change):
    document = json.loads(json.dumps(data))
    change(document)
    return document


JSON_CASES = {
    "Infinity in a shape": (lambda d: d["model"]["shape"].update(n_layer="@"), lambda text: text.replace('"@"', "Infinity"),
                            "Infinity is not allowed"),
    "NaN in the settings": (lambda d: d["settings"].update(top_p="@"), lambda text: text.replace('"@"', "NaN"),
                            "NaN is not allowed"),
    "message not an object": (lambda d: d["messages"].append("hello"), None, "message 2 is a string"),
    "message without text": (lambda d: d["messages"][0].pop("text"), None, "message 0 needs a role"),
    "unknown role": (lambda d: d["messages"][0].update(role="system"), None, "message 0 needs a role"),
    "float layer count": (lambda d: d["model"]["shape"].update(n_layer=2.0), None, "n_layer is '2.0'"),
    "string vocab": (lambda d: d["model"]["shape"].update(vocab_size="65536"), None, "vocab_size is '65536'"),
    "extra shape field": (lambda d: d["model"]["shape"].update(extra=1), None, "model shape has fields"),
    "heads disagree": (lambda d: d["model"]["shape"].update(n_head=3), None, "3 heads of 64"),
    "unknown version": (lambda d: d["model"]["shape"].update(version="5.1"), None, "version '5.1'"),
    "negative tokens": (lambda d: d.update(tokens=-1), None, "token count -1 is negative"),
    "boolean tokens": (lambda d: d.update(tokens=True), None, "'tokens' entry is missing or not a int"),
    "turn after the end": (lambda d: d["last_turn"].update(tokens_before=10**9), None, "last_turn starts at"),
    "turn prompt a number": (lambda d: d["last_turn"].update(prompt=3), None, "last_turn 'prompt'"),
    "chat not an object": (lambda d: d.update(chat=[1]), None, "'chat' entry is a list"),
    "unknown chat entry": (lambda d: d["chat"].update(colour="red"), None, "chat entry 'colour'"),
    "NUL in the state file path": (lambda d: d.update(state_file="a\0b"), None, "NUL"),
    "stats not numbers": (lambda d: d["messages"][1].update(stats={"seconds": "fast"}), None, "damaged stats"),
    "deep nesting": (None, lambda text: text.replace('"settings": {', '"deep": ' + "[" * 100_000 + "]" * 100_000
                                                     + ', "settings": {'), "nested too deeply"),
    "17 levels": (None, lambda text: text.replace('"settings": {', '"deep": ' + "[" * 17 + "]" * 17
                                                  + ', "settings": {'), "deeper than 16 levels"),
    "huge integer": (lambda d: d.update(tokens="@"), lambda text: text.replace('"@"', "9" * 5000), "4300"),
    "not JSON": (None, lambda text: text[:-5], "damaged"),
    "lone surrogate in a message": (lambda d: d["messages"][0].update(text="a\0b\ud800"), None,
                                    "not valid Unicode (a lone surrogate) at messages[0].text"),
    "lone surrogate in a key": (lambda d: d["chat"].update({"\udfff": 1}), None, "a lone surrogate) at chat"),
}


@pytest.mark.parametrize("name", JSON_CASES)
def test_damaged_descriptions_are_refused(saved, tmp_path, name):
    pipe, data, tensors = saved
    change_doc, change_text, message = JSON_CASES[name]
    document = _changed(data, change_doc) if change_doc else data
    text = json.dumps(document)
    if change_text:
        changed = change_text(text)
        assert changed != text, "the test edit did not apply"
        text = changed
    assert message in refused(pipe, write(tmp_path, document, tensors, text))


def test_description_size_limit(saved, tmp_path, monkeypatch):
    pipe, data, tensors = saved
    monkeypatch.setattr(snapshots, "MAX_JSON_BYTES", 1000)
    assert "the limit is 1000" in refused(pipe, write(tmp_path, data, tensors))
    assert snapshots.list_snapshots(tmp_path) == []


def test_a_failing_safetensors_write_is_a_snapshot_error(tmp_path, monkeypatch):
    """Disk full while writing surfaces from safetensors as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(snapshots, "save_file", full_disk)
    with pytest.raises(SnapshotError, match="cannot save the conversation .*(No space left|the disk is full)"):
        snapshots.write_snapshot(tmp_path / "x.rwkvchat", {}, {"": {"logits": torch.zeros(3)}})
    assert list(tmp_path.iterdir()) == []
