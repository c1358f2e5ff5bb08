"""RWKV.forward_batch: B sequences, one token each, against running each sequence alone."""
from __future__ import annotations

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.errors import TokenError
from rwkv_chat.testing.checkpoints import VERSIONS

PROMPTS = ([1, 2, 3, 4], [500, 17], [9000, 8, 77, 1234, 5, 60])
STEPS = 4
STRATEGIES = ("cpu fp32", "cpu bf16", "cpu fp32i8", "cpu bf16i8", "cpu bf16i8a8", "cpu bf16i4")
# Without the C kernels the batch runs torch's GEMMs where one token runs its GEMV: the same math,
# other blocking. Largest differences seen (relative to the largest logit): fp32 ~2e-7, bf16 ~1e-2.
TOLERANCE = 0.1


def greedy_alone(model, prompt, steps):
    logits, state = model.forward(prompt)
    rows, ids = [logits], []
    for _ in range(steps):
        token = int(logits.argmax())
        ids.append(token)
        logits, state = model.forward([token], state)
        rows.append(logits)
    return torch.stack(rows), ids, state


def has_kernels(model) -> bool:
    return model.layers[0].ops.kernels is not None


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("version", VERSIONS)
def test_batched_decoding_matches_each_sequence_alone(make_model_file, version, strategy):
    """Three sequences decode together, fed the tokens each chose alone (greedy). With the C
    kernels every row of a batch is computed exactly as alone: the logits are bitwise equal."""
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
        if has_kernels(model):
            assert torch.equal(batched[b], want_rows), (version, strategy, b)
            for got_layer, want_layer in zip(states[b].layers, want_state.layers):
                assert all(torch.equal(got, want) for got, want in zip(got_layer, want_layer))
        else:
            diff = (batched[b] - want_rows).abs().max()
            assert float(diff) <= TOLERANCE * float(want_rows.abs().max()), (version, strategy, b, float(diff))
        assert states[b].tokens == want_state.tokens
        assert torch.equal(states[b].logits, batched[b, -1])
        for got_layer, want_layer in zip(states[b].layers, want_state.layers):
            for got, want in zip(got_layer, want_layer):
                assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()


@pytest.mark.parametrize("version", ["4", "7"])
def test_a_batch_larger_than_the_kernel_rows_is_still_row_exact(make_model_file, version):
    """More sequences than the GEMV takes at once (quant.KERNEL_ROWS): the linears outside the
    one-call layers run in chunks of rows, so the rows still equal each sequence alone."""
    from rwkv_chat.engine.quant import KERNEL_ROWS

    model = RWKV(make_model_file(version, n_layer=2, n_embd=64), strategy="cpu bf16i8")
    if not has_kernels(model):
        pytest.skip("the C kernels are not available")
    B = KERNEL_ROWS + 3
    states = [model.forward([b + 1, 2 * b + 5])[1] for b in range(B)]
    tokens = [100 + 7 * b for b in range(B)]
    logits, _ = model.forward_batch(tokens, states)
    for b in range(B):
        assert torch.equal(logits[b], model.forward([tokens[b]], states[b])[0]), b


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16i8"])
@pytest.mark.parametrize("version", ["6", "7"])
def test_a_sequence_alone_splits_its_heads_over_the_threads_with_the_same_bits(make_model_file, version, strategy,
                                                                             threads):
    """Alone, a sequence's recurrences run as ranges of its heads on the kernels' threads (three
    heads on 2 threads: 0 | 1-2; on 3: one each); in a batch of three each sequence takes a thread
    whole. Every head's arithmetic is the same either way: the logits are bitwise equal."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = RWKV(make_model_file(version, n_layer=2, n_embd=192), strategy=strategy)
        if not has_kernels(model):
            pytest.skip("the C kernels are not available")
        alone = [greedy_alone(model, p, STEPS) for p in PROMPTS]
        states = [model.forward(p)[1] for p in PROMPTS]
        for step in range(STEPS):
            logits, states = model.forward_batch([ids[step] for _, ids, _ in alone], states)
            for b, (want_rows, _, _) in enumerate(alone):
                assert torch.equal(logits[b], want_rows[step + 1]), (step, b)
    finally:
        torch.set_num_threads(previous)


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
