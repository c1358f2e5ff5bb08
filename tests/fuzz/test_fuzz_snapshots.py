"""Fuzzing saved conversations (.rwkvchat): mutated JSON descriptions, mutated state tensors and
mutated file bytes either open (and then run and sample) or raise RWKVChatError."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from rwkv_chat.chat import snapshot as snapshots
from rwkv_chat.chat.session import ChatSession
from rwkv_chat.engine.model import RWKV
from rwkv_chat.pipeline import Pipeline
from rwkv_chat.sampling import Sampler, SamplingSettings
from rwkv_chat.testing.checkpoints import make_checkpoint

from .conftest import byte_op, fuzz_settings, loads_or_our_error, mutate_bytes, mutate_tensors, tensor_op


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("fuzz-snapshot-model") / "v7.pth"
    torch.save(make_checkpoint("7", 2, 64, vocab_size=64, head_size=32), path)
    return Pipeline(RWKV(path, progress=None), tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    from rwkv_chat.tokenizer import Tokenizer

    return Tokenizer()


@pytest.fixture(scope="module")
def base(pipeline):
    """A snapshot as ChatSession writes it: (JSON document, flat tensors)."""
    model = pipeline.model
    _, before = model.forward([1, 2])
    _, after = model.forward([3, 4, 5], before)
    data = {
        "format": snapshots.FORMAT, "format_version": snapshots.FORMAT_VERSION, "saved_at": "2026-01-01T00:00:00+00:00",
        "messages": [{"role": "user", "text": "hi", "stats": None, "finish_reason": None},
                     {"role": "assistant", "text": "yo", "finish_reason": "stop",
                      "stats": {"prompt_tokens": 2, "generated_tokens": 3, "time_to_first_token": 0.1,
                                "seconds": 0.5, "tokens_per_second": 6.0}}],
        "settings": SamplingSettings().to_dict(),
        "model": {"path": str(model.path), "name": "v7.pth", "version": "7", "shape": model.shape.to_dict(),
                  "fingerprint": model.fingerprint},
        "state_file": None, "tokens": after.tokens,
        "chat": {"user": "User", "assistant": "Assistant", "preamble": ""},
        "needs_turn_end": False,
        "last_turn": {"prompt": "User: hi\n\nAssistant:", "raw_reply": " yo", "ended_by_stop": False,
                      "tokens_before": before.tokens},
    }
    tensors = dict(after.to_tensors())
    tensors.update({f"{snapshots.TURN_START_STATE}.{k}": v for k, v in before.to_tensors().items()})
    return data, tensors


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / f"case{snapshots.SUFFIX}"


def _write(path, text: str, tensors: dict) -> bool:
    try:
        save_file(tensors, str(path), metadata={snapshots.METADATA_KEY: text})
        return True
    except Exception:  # safetensors cannot store this mutation (non-tensor, sparse, odd keys...)
        return False


def _open_and_run(pipeline, path) -> None:
    session = ChatSession.open(pipeline, path)
    state = session.state
    if state.logits is not None:
        Sampler(0).sample(state.logits, session.settings)
    pipeline.model.forward([1], state)


def test_unmutated_base_opens(pipeline, base, case_file):
    data, tensors = base
    assert _write(case_file, json.dumps(data), tensors)
    assert loads_or_our_error(lambda: _open_and_run(pipeline, case_file))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_subnormal=False),
                      st.text(max_size=12), st.sampled_from(["user", "assistant", "7", "4", "", "\0"]))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
# where to change the document: a path of keys/indices, resolved against whatever is there
json_path = st.lists(st.one_of(st.sampled_from(["messages", "settings", "model", "shape", "tokens", "chat",
                                                "last_turn", "tokens_before", "role", "text", "stats", "n_layer",
                                                "vocab_size", "version", "format_version", "state_file",
                                                "temperature", "token_ban", "stop"]),
                               st.integers(0, 3)), min_size=1, max_size=4)
json_op = st.one_of(st.tuples(st.just("set"), json_path, json_value), st.tuples(st.just("delete"), json_path))
RAW_TEXT = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "[" * 100_000 + "]" * 100_000,
            "{\"a\":" * 50 + "1" + "}" * 50, "\"\\ud800\"", "", "null", "[]", "\"x\"" + " " * 10]


def _edit(document, path, value=None, delete=False):
    node = document
    for step in path[:-1]:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if delete:
            del node[last]
        else:
            node[last] = value


@fuzz_settings(1000)
@given(ops=st.lists(json_op, min_size=1, max_size=4), raw=st.none() | st.tuples(json_path, st.sampled_from(RAW_TEXT)))
def test_mutated_snapshot_json(pipeline, base, case_file, ops, raw):
    data, tensors = base
    document = json.loads(json.dumps(data))
    for op in ops:
        _edit(document, op[1], *((op[2],) if op[0] == "set" else (None, True)))
    if raw is not None:  # text json.dumps never writes, spliced in where a value was
        marker = "\"__RAW__\""
        _edit(document, raw[0], "__RAW__")
        text = json.dumps(document).replace(marker, raw[1], 1)
    else:
        text = json.dumps(document)
    if _write(case_file, text, tensors):
        loads_or_our_error(lambda: _open_and_run(pipeline, case_file))


@fuzz_settings(1000)
@given(ops=st.lists(tensor_op, min_size=1, max_size=3))
def test_mutated_snapshot_tensors(pipeline, base, case_file, ops):
    data, tensors = base
    mutated = mutate_tensors(tensors, ops)
    if _write(case_file, json.dumps(data), {k: v for k, v in mutated.items()}):
        loads_or_our_error(lambda: _open_and_run(pipeline, case_file))


@fuzz_settings(450)
@given(ops=st.lists(byte_op, min_size=1, max_size=4))
def test_mutated_snapshot_bytes(pipeline, base, case_file, ops):
    data, tensors = base
    assert _write(case_file, json.dumps(data), tensors)
    case_file.write_bytes(mutate_bytes(case_file.read_bytes(), ops))
    loads_or_our_error(lambda: _open_and_run(pipeline, case_file))
