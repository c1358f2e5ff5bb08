"""Recurrent state objects, tuned state files (RWKV-PEFT layout) and merged states."""
import copy

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.errors import ModelLoadError
from rwkv_chat.testing.checkpoints import make_checkpoint, make_state_file, merge_state, save_checkpoint
from tests.oracle import oracle_logits_many

STATE_VERSIONS = ("5.2", "6", "7")
TOKENS = [[5, 900, 11], [261], [40000]]


def relative_error(ours, reference):
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def state_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    files = {}
    for version in STATE_VERSIONS:
        model = folder / f"v{version}.pth"
        weights = make_checkpoint(version, 2, 128, seed=4)
        save_checkpoint(model, weights)
        tuned = make_state_file(version, 2, 128, 64, seed=5)
        state = folder / f"v{version}-state.pth"
        save_checkpoint(state, tuned)
        merged = folder / f"v{version}-merged.pth"
        save_checkpoint(merged, merge_state(weights, tuned))
        files[version] = dict(model=model, state=state, merged=merged)
    requests = [dict(model_path=str(f["model"]), strategy="cpu fp32", token_batches=TOKENS, state_file=str(f["state"]))
                for f in files.values()]
    reference = dict(zip(STATE_VERSIONS, oracle_logits_many(requests)))
    return files, reference


@pytest.mark.parametrize("version", STATE_VERSIONS)
def test_tuned_state_file_matches_reference(version, state_setup):
    files, reference = state_setup
    model = RWKV(files[version]["model"])
    state = model.load_state(files[version]["state"])
    for batch, expected in zip(TOKENS, reference[version]):
        logits, state = model.forward(batch, state)
        assert relative_error(logits, expected) <= 1e-3
    zero_logits, _ = model.forward(TOKENS[0])
    assert relative_error(zero_logits, reference[version][0]) > 1e-2, "the tuned state made no difference"


@pytest.mark.parametrize("version", STATE_VERSIONS)
def test_merged_state_is_the_initial_state(version, state_setup):
    files, _ = state_setup
    merged = RWKV(files[version]["merged"])
    plain = RWKV(files[version]["model"])
    from_file = plain.forward(TOKENS[0], plain.load_state(files[version]["state"]))[0]
    assert torch.allclose(merged.forward(TOKENS[0])[0], from_file, rtol=0, atol=1e-5)
    assert not torch.allclose(plain.forward(TOKENS[0])[0], from_file, atol=1e-3)


@pytest.mark.parametrize("version", STATE_VERSIONS)
def test_time_state_export_round_trip(version, state_setup, tmp_path):
    files, _ = state_setup
    model = RWKV(files[version]["model"])
    _, state = model.forward([1, 2, 3, 4])
    exported = tmp_path / "exported.pth"
    save_checkpoint(exported, state.to_time_state())
    reloaded = model.load_state(exported)
    for ours, theirs in zip(state.layers, reloaded.layers):
        assert torch.equal(ours[1], theirs[1])


def test_state_file_for_another_shape_is_refused(state_setup, tmp_path):
    files, _ = state_setup
    model = RWKV(files["7"]["model"])
    wrong_layers = tmp_path / "layers.pth"
    save_checkpoint(wrong_layers, make_state_file("7", 3, 128, 64, seed=1))
    with pytest.raises(ModelLoadError, match="time_state for 3 layer"):
        model.load_state(wrong_layers)
    wrong_heads = tmp_path / "heads.pth"
    save_checkpoint(wrong_heads, make_state_file("7", 2, 128, 32, seed=1))
    with pytest.raises(ModelLoadError, match=r"\[4 heads x 32\], the model has 2 heads of 64"):
        model.load_state(wrong_heads)
    with pytest.raises(ModelLoadError, match="not a tuned state file"):
        model.load_state(files["7"]["model"])
    with pytest.raises(ModelLoadError, match="no such state file"):
        model.load_state(tmp_path / "absent.pth")


def test_v4_has_no_tuned_states(tmp_path):
    path = tmp_path / "v4.pth"
    save_checkpoint(path, make_checkpoint("4", 2, 128, seed=1))
    state = tmp_path / "state.pth"
    save_checkpoint(state, make_state_file("7", 2, 128, 64, seed=1))
    with pytest.raises(ModelLoadError, match="v5.2, v6 and v7 only"):
        RWKV(path).load_state(state)


def test_state_copies_are_independent_and_carry_logits(state_setup):
    files, _ = state_setup
    model = RWKV(files["6"]["model"])
    fresh = model.initial_state()
    assert fresh.logits is None and fresh.tokens == 0
    logits, state = model.forward([7, 8])
    assert torch.equal(state.logits, logits) and state.tokens == 2
    fork = copy.deepcopy(state)
    fork.layers[0][1].add_(1.0)
    fork.logits.add_(1.0)
    assert not torch.equal(fork.layers[0][1], state.layers[0][1])
    assert torch.equal(state.logits, logits)


def test_state_tensors_round_trip(state_setup):
    files, _ = state_setup
    model = RWKV(files["5.2"]["model"])
    _, state = model.forward([3, 1, 4, 1, 5])
    rebuilt = model.state_from_tensors(state.to_tensors(), tokens=state.tokens)
    assert torch.equal(model.forward([9], rebuilt)[0], model.forward([9], state)[0])
