"""Fuzzing checkpoints and tuned state files: mutated tensor dicts and mutated file bytes either
load (and then run and sample) or raise RWKVChatError; nothing else, never a hang."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rwkv_chat.chat.state_files import read_state_file_info
from rwkv_chat.engine.model import RWKV
from rwkv_chat.sampling import Sampler, SamplingSettings
from rwkv_chat.testing.checkpoints import VERSIONS, make_checkpoint, make_state_file, merge_state

from .conftest import byte_op, fuzz_settings, loads_or_our_error, mutate_bytes, mutate_tensors, tensor_op

SHAPE = dict(n_layer=2, n_embd=64, vocab_size=64)
SETTINGS = SamplingSettings(temperature=1.0, top_p=0.5, token_ban=())


def _checkpoint(version: str, merged: bool) -> dict:
    kw = {} if version == "4" else {"head_size": 32}
    sd = make_checkpoint(version, SHAPE["n_layer"], SHAPE["n_embd"], vocab_size=SHAPE["vocab_size"], **kw)
    return merge_state(sd, make_state_file(version, 2, 64, 32, seed=1)) if merged else sd


BASES = {(v, merged): _checkpoint(v, merged) for v in VERSIONS for merged in (False, True) if not (merged and v == "4")}
BASE_BYTES = {}


def _saved_bytes(key) -> bytes:
    if key not in BASE_BYTES:
        buffer = io.BytesIO()
        torch.save(BASES[key], buffer)
        BASE_BYTES[key] = buffer.getvalue()
    return BASE_BYTES[key]


def _run(model: RWKV) -> None:
    logits, state = model.forward([0, 1])
    Sampler(0).sample(logits, SETTINGS)
    model.forward([2], state)


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "case.pth"


def _save(path, data) -> bool:
    try:
        torch.save(data, path)
        return True
    except Exception:  # some mutations (junk keys) cannot even be saved: nothing to read then
        return False


def test_unmutated_bases_load(case_file):
    for key, sd in BASES.items():
        torch.save(sd, case_file)
        assert loads_or_our_error(lambda: _run(RWKV(case_file, progress=None))), key


@fuzz_settings(1500)
@given(key=st.sampled_from(sorted(BASES)), ops=st.lists(tensor_op, min_size=1, max_size=4))
def test_mutated_checkpoint_dicts(case_file, key, ops):
    if _save(case_file, mutate_tensors(BASES[key], ops)):
        loads_or_our_error(lambda: _run(RWKV(case_file, progress=None)))


@fuzz_settings(500)
@given(key=st.sampled_from(sorted(BASES)), ops=st.lists(byte_op, min_size=1, max_size=4))
def test_mutated_checkpoint_bytes(case_file, key, ops):
    case_file.write_bytes(mutate_bytes(_saved_bytes(key), ops))
    loads_or_our_error(lambda: _run(RWKV(case_file, progress=None)))


# ------------------------------------------------------------------ tuned state files
STATE_BASES = {v: make_state_file(v, 2, 64, 32, seed=2) for v in ("5.2", "7")}


@pytest.fixture(scope="module")
def state_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-models")
    models = {}
    for version in STATE_BASES:
        torch.save(BASES[version, False], folder / f"v{version}.pth")
        models[version] = RWKV(folder / f"v{version}.pth", progress=None)
    return models


def _use_state_file(model: RWKV, path) -> None:
    loaded = True
    if not loads_or_our_error(lambda: read_state_file_info(path)):
        loaded = False
    state = None

    def load():
        nonlocal state
        state = model.load_state(path)

    if loads_or_our_error(load):
        assert loaded, "load_state accepted a file that the state-file listing refuses"
        loads_or_our_error(lambda: model.forward([1], state))


@fuzz_settings(1500)
@given(version=st.sampled_from(sorted(STATE_BASES)), ops=st.lists(tensor_op, min_size=1, max_size=3))
def test_mutated_state_file_dicts(state_models, case_file, version, ops):
    if _save(case_file, mutate_tensors(STATE_BASES[version], ops)):
        _use_state_file(state_models[version], case_file)


@fuzz_settings(500)
@given(version=st.sampled_from(sorted(STATE_BASES)), ops=st.lists(byte_op, min_size=1, max_size=4))
def test_mutated_state_file_bytes(state_models, case_file, version, ops):
    buffer = io.BytesIO()
    torch.save(STATE_BASES[version], buffer)
    case_file.write_bytes(mutate_bytes(buffer.getvalue(), ops))
    _use_state_file(state_models[version], case_file)
