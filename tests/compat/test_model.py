"""rwkv_chat.compat.model.RWKV: 0.8.32's constructor, attributes, flat state list and forward;
and the engine's forward returning ordinary (editable) tensors."""
from __future__ import annotations

import copy

import pytest
import torch

from rwkv_chat import RWKV as EngineRWKV
from rwkv_chat.compat.model import RWKV
from rwkv_chat.errors import ModelLoadError, StateMismatchError

from .conftest import SHAPE


@pytest.fixture(scope="module", params=["4", "7"])
def checkpoint(request, make_model_file):
    return request.param, make_model_file(request.param, **SHAPE)


def test_engine_forward_returns_tensors_callers_may_edit(make_model_file):
    model = EngineRWKV(make_model_file("7", **SHAPE), progress=None)
    logits, state = model.forward([1, 2, 3], None)
    tensors = [logits, state.logits, *(t for layer in state.layers for t in layer)]
    assert not any(t.is_inference() for t in tensors)
    expected, _ = model.forward([4], state)
    logits[0] -= 1e10  # ChatRWKV's most common line; raised RuntimeError with inference tensors
    edited = copy.deepcopy(state)
    edited.layers[0][1].mul_(0.5)  # states can be edited in place too, and that is what runs next
    assert torch.equal(model.forward([4], state)[0], expected)
    assert not torch.equal(model.forward([4], edited)[0], expected)


def test_attributes_follow_0_8_32(checkpoint):
    version, path = checkpoint
    model = RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32i8 *1 -> cpu fp32", verbose=False)
    assert model.version == {"4": 4, "7": 7}[version]
    args = model.args
    assert (args.n_layer, args.n_embd, args.vocab_size) == (2, 64, 65536)
    assert (args.n_head, args.head_size, args.n_att) == (1, 64, 64)
    assert args.n_ffn == 256 and args.MODEL_NAME == str(path)
    assert (model.n_layer, model.n_embd, model.n_head, model.head_size) == (2, 64, 1, 64)
    assert len(model.strategy) == args.n_layer + 1
    first, last = model.strategy[0], model.strategy[-1]
    assert (first.device, first.atype, first.wtype, first.stream) == ("cpu", torch.float32, torch.uint8, False)
    assert (last.device, last.atype, last.wtype) == ("cpu", torch.float32, torch.float32)


def test_forward_state_list_layout_and_in_place_update(checkpoint):
    version, path = checkpoint
    model = RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    engine_logits, engine_state = model.engine.forward([5, 6, 7], None)
    out, state = model.forward([5, 6, 7], None)
    assert isinstance(state, list) and out.shape == (65536,)
    assert torch.equal(out, engine_logits)
    assert all(torch.equal(a, b) for a, b in zip(state, (t for layer in engine_state.layers for t in layer)))
    per_layer = 5 if version == "4" else 3
    assert len(state) == per_layer * 2
    zero = model.generate_zero_state()
    assert [t.shape for t in zero] == [t.shape for t in state]
    if version == "4":
        assert torch.all(zero[3] == -1e30) and torch.all(zero[1] == 0)
    else:
        assert zero[1].shape == (1, 64, 64) and zero[1].dtype == torch.float32
    saved = copy.deepcopy(state)
    out2, same_list = model.forward([8], state)
    assert same_list is state  # 0.8.32 updates the list it was given and returns it
    out3, _ = model.forward(8, saved)  # one id without a list works too
    assert torch.equal(out2, out3)


def test_full_output_shapes_follow_0_8_32(checkpoint):
    _, path = checkpoint
    model = RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    many, _ = model.forward([5, 6, 7], None, full_output=True)
    one, _ = model.forward([5], None, full_output=True)
    assert many.shape == (3, 65536) and one.shape == (65536,)  # one token: last-token logits, as there
    torch.testing.assert_close(many[0], one)


def test_hand_made_state_in_another_dtype_is_converted(checkpoint):
    _, path = checkpoint
    model = RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    _, state = model.forward([5, 6], None)
    as_double = [t.double() for t in state]
    torch.testing.assert_close(model.forward([7], as_double)[0], model.forward([7], state)[0])


def test_bad_states_and_options_are_refused_clearly(checkpoint):
    _, path = checkpoint
    model = RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    state = model.generate_zero_state()
    with pytest.raises(StateMismatchError, match="list of"):
        model.forward([1], state[:-1])
    state[1] = torch.zeros(3)
    with pytest.raises(StateMismatchError, match=r"state\[1\] \(layer 0\)"):
        model.forward([1], state)
    with pytest.raises(ModelLoadError, match="convert_and_save_and_exit"):
        RWKV(model=str(path), strategy="cpu fp32", convert_and_save_and_exit="x.pth")
    with pytest.raises(ModelLoadError, match="no such file"):
        RWKV(model=str(path) + "-missing", strategy="cpu fp32")


def test_load_state_gives_the_flat_list_of_the_engines_state(make_model_file, make_state_path):
    model = RWKV(model=str(make_model_file("7", **SHAPE)), strategy="cpu fp32", verbose=False)
    state_file = make_state_path("7", n_layer=2, n_embd=64)
    flat = model.load_state(state_file)
    engine_state = model.engine.load_state(state_file)
    assert all(torch.equal(a, b) for a, b in zip(flat, (t for layer in engine_state.layers for t in layer)))
    assert torch.equal(model.forward([5], flat)[0], model.engine.forward([5], engine_state)[0])
    assert not torch.equal(model.forward([5], model.load_state(state_file))[0], model.forward([5], None)[0])
