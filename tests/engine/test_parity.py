"""fp32 logits against the reference implementation (rwkv==0.8.32) on every version."""
import copy

import pytest
import torch

from rwkv_chat import RWKV
from tests.oracle import oracle_logits_many

from .conftest import SHAPES, VERSIONS

CASES = [(v, s) for v in VERSIONS for s in SHAPES]
SPLIT = 9


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def reference(engine_models, token_sequence):
    """All oracle runs in one subprocess: {(version, shape): {case: [logits per call]}}."""
    prefix, rest = token_sequence[:SPLIT], token_sequence[SPLIT:]
    fork_a, fork_b = rest[:3], rest[3:6]
    cases = {
        "sequence": dict(token_batches=[token_sequence], full_output=True),
        "one_by_one": dict(token_batches=[[t] for t in token_sequence]),
        "prefix_then_ones": dict(token_batches=[prefix] + [[t] for t in rest]),
        "fork_a": dict(token_batches=[prefix] + [[t] for t in fork_a]),
        "fork_b": dict(token_batches=[prefix] + [[t] for t in fork_b]),
    }
    requests, keys = [], []
    for key in CASES:
        for name, case in cases.items():
            requests.append(dict(model_path=str(engine_models[key]), strategy="cpu fp32", **case))
            keys.append((key, name))
    results = oracle_logits_many(requests)
    table = {}
    for (key, name), logits in zip(keys, results):
        table.setdefault(key, {})[name] = logits
    return table


@pytest.fixture(scope="module")
def models(engine_models):
    return {key: RWKV(engine_models[key], "cpu fp32") for key in CASES}


@pytest.mark.parametrize("key", CASES, ids=[f"v{v}-{s}" for v, s in CASES])
class TestMatchesReference:
    def test_whole_sequence(self, key, models, reference, token_sequence):
        logits, state = models[key].forward(token_sequence, full_output=True)
        expected = reference[key]["sequence"][0]
        assert logits.shape == expected.shape == (len(token_sequence), 65536)
        assert relative_error(logits, expected) <= 1e-3
        assert state.tokens == len(token_sequence)

    def test_one_token_at_a_time(self, key, models, reference, token_sequence):
        state = None
        for token, expected in zip(token_sequence, reference[key]["one_by_one"]):
            logits, state = models[key].forward([token], state)
            assert relative_error(logits, expected) <= 1e-3

    def test_prefix_then_single_tokens(self, key, models, reference, token_sequence):
        expected = reference[key]["prefix_then_ones"]
        logits, state = models[key].forward(token_sequence[:SPLIT])
        assert relative_error(logits, expected[0]) <= 1e-3
        for token, want in zip(token_sequence[SPLIT:], expected[1:]):
            logits, state = models[key].forward([token], state)
            assert relative_error(logits, want) <= 1e-3

    def test_forked_state_runs_independently(self, key, models, reference, token_sequence):
        model = models[key]
        rest = token_sequence[SPLIT:]
        _, state = model.forward(token_sequence[:SPLIT])
        before = [t.clone() for layer in state.layers for t in layer]
        fork = copy.deepcopy(state)
        for token, want in zip(rest[:3], reference[key]["fork_a"][1:]):
            logits, fork = model.forward([token], fork)
            assert relative_error(logits, want) <= 1e-3
        after = [t for layer in state.layers for t in layer]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "running the fork changed the original"
        for token, want in zip(rest[3:6], reference[key]["fork_b"][1:]):
            logits, state = model.forward([token], state)
            assert relative_error(logits, want) <= 1e-3


def test_history_matters(models, token_sequence):
    """Guards the parity tests against a degenerate model: context must move the logits."""
    for model in models.values():
        a, _ = model.forward(token_sequence[:5])
        b, _ = model.forward([7, 8, 9, 10] + token_sequence[4:5])
        assert relative_error(a, b) > 1e-2
