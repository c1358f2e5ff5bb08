"""RWKV.forward_batch: B sequences, one token each, against running each sequence alone."""
from __future__ import annotations

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.errors import TokenError
from rwkv_chat.testing.checkpoints import VERSIONS

PROMPTS = ([1, 2, 3, 4], [500, 17], [9000, 8, 77, 1234, 5, 60])
STEPS = 4
# The same math on the same rows; only the GEMM's blocking (and for *i8 its activation rounding:
# per-token int8 or bf16 instead of the single-token kernel's u8) differs from one token alone.
# Largest differences seen (relative to the largest logit): fp32 ~2e-7, bf16 ~1e-2, *i8 ~2e-2.
TOLERANCE = {"cpu fp32": 1e-5, "cpu bf16": 0.05, "cpu fp32i8": 0.08, "cpu bf16i8": 0.08}


def greedy_alone(model, prompt, steps):
    logits, state = model.forward(prompt)
    rows, ids = [logits], []
    for _ in range(steps):
        token = int(logits.argmax())
        ids.append(token)
        logits, state = model.forward([token], state)
        rows.append(logits)
    return torch.stack(rows), ids, state


@pytest.mark.parametrize("strategy", list(TOLERANCE))
@pytest.mark.parametrize("version", VERSIONS)
def test_batched_decoding_matches_each_sequence_alone(make_model_file, version, strategy):
    """Three sequences decode together, fed the tokens each chose alone (greedy): every step's
    logits match; fp32 picks the same argmax, the lossy strategies wherever the margin allows."""
    model = RWKV(make_model_file(version, n_layer=2, n_embd=64), strategy=strategy)
    alone = [greedy_alone(model, p, STEPS) for p in PROMPTS]

    states = [model.forward(p)[1] for p in PROMPTS]
    kept = [s.copy() for s in states]
    rows = []
    for step in range(STEPS):
        tokens = [ids[step] for _, ids, _ in alone]
        logits, new_states = model.forward_batch(tokens, states)
        for old, copy in zip(states, kept):  # the states passed in are untouched
            assert all(torch.equal(a, b) for la, lb in zip(old.layers, copy.layers) for a, b in zip(la, lb))
        states, kept = new_states, [s.copy() for s in new_states]
        rows.append(logits)
    batched = torch.stack(rows, dim=1)  # [B, steps, vocab]
    for b, (want_rows, want_ids, want_state) in enumerate(alone):
        want_rows = want_rows[1:]
        diff = (batched[b] - want_rows).abs().max()
        assert float(diff) <= TOLERANCE[strategy] * float(want_rows.abs().max()), (version, strategy, b, float(diff))
        top2 = want_rows.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * diff  # steps whose argmax rounding cannot flip
        if strategy == "cpu fp32":
            assert bool(clear[:-1].all())
        same = batched[b].argmax(dim=-1) == want_rows.argmax(dim=-1)
        assert bool(same[clear].all())
        assert states[b].tokens == want_state.tokens
        assert torch.equal(states[b].logits, batched[b, -1])
        for got_layer, want_layer in zip(states[b].layers, want_state.layers):
            for got, want in zip(got_layer, want_layer):
                assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_batch_of_one_is_the_single_token_forward(load_model, version):
    model = load_model(version)
    _, state = model.forward([5, 6, 7])
    want, _ = model.forward([8], state)
    got, (new_state,) = model.forward_batch([8], [state])
    assert torch.equal(got[0], want)
    assert new_state.tokens == 4


def test_fresh_states_and_errors(load_model):
    model = load_model("7")
    logits, states = model.forward_batch([3, 3], [None, model.initial_state()])
    assert torch.equal(logits[0], logits[1])
    assert torch.allclose(logits[0], model.forward([3])[0], atol=1e-5)
    with pytest.raises(TokenError, match="2 tokens for 1 states"):
        model.forward_batch([1, 2], [None])


def test_greedy_tokens_batched_equal_alone_fp32(load_model):
    """Free-running greedy decoding (each sequence feeds its own argmax) in fp32: the same ids."""
    model = load_model("7")
    alone = [greedy_alone(model, p, STEPS)[1] for p in PROMPTS]
    results = [model.forward(p) for p in PROMPTS]
    logits, states = torch.stack([lg for lg, _ in results]), [s for _, s in results]
    got = []
    for _ in range(STEPS):
        tokens = [int(t) for t in logits.argmax(dim=-1)]
        got.append(tokens)
        logits, states = model.forward_batch(tokens, states)
    assert [list(col) for col in zip(*got)] == alone
