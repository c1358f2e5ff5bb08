"""Pipeline: prefill, greedy and sampled generation, stop strings, live settings, cancel, stats.

Random weights write gibberish, so the checks compare tokens, logits and states with an
independent loop over `model.forward`, never words."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from rwkv_chat.pipeline import Generation, Pipeline, StopStringFilter
from rwkv_chat.sampling import SamplingSettings

PROMPT = "User: tell me a story\n\nAssistant:"
GREEDY = SamplingSettings(temperature=0, presence=0, frequency=0)
SAMPLED = SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, presence=0, frequency=0)


def argmax_loop(model, prompt_tokens: list[int], steps: int, banned=(0,)):
    """Greedy decoding written directly against model.forward: (tokens, final state)."""
    logits, state = model.forward(prompt_tokens, None)
    tokens = []
    for _ in range(steps):
        scores = logits.clone()
        scores[list(banned)] = -math.inf
        token = int(torch.argmax(scores))
        tokens.append(token)
        logits, state = model.forward([token], state)
    return tokens, state


def feed_one_by_one(model, prompt_tokens: list[int], tokens: list[int]):
    _, state = model.forward(prompt_tokens, None)
    for token in tokens:
        _, state = model.forward([token], state)
    return state


def argmax_at_each_step(model, prompt_tokens: list[int], tokens: list[int], banned=(0,)) -> list[int]:
    logits, state = model.forward(prompt_tokens, None)
    best = []
    for token in tokens:
        scores = logits.clone()
        scores[list(banned)] = -math.inf
        best.append(int(torch.argmax(scores)))
        logits, state = model.forward([token], state)
    return best


# ------------------------------------------------------------------ greedy and prefill
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_greedy_generation_equals_an_independent_argmax_loop(make_pipeline, version, assert_same_state):
    pipe = make_pipeline(version)
    prompt_tokens = pipe.encode(PROMPT)
    expected_tokens, expected_state = argmax_loop(pipe.model, prompt_tokens, 6)

    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=6)
    text = "".join(gen)

    assert gen.tokens == expected_tokens
    assert text == gen.text == pipe.decode(expected_tokens)
    assert gen.finish_reason == "length"
    assert_same_state(gen.state, expected_state)


def test_generate_returns_text_and_state(pipe, assert_same_state):
    text, state = pipe.generate(PROMPT, settings=GREEDY, max_tokens=4)
    tokens, expected_state = argmax_loop(pipe.model, pipe.encode(PROMPT), 4)
    assert text == pipe.decode(tokens)
    assert_same_state(state, expected_state)


def test_temperature_zero_ignores_seed_and_top_p(pipe):
    runs = [pipe.generate(PROMPT, settings=GREEDY, max_tokens=4, seed=seed, top_p=top_p)[0]
            for seed, top_p in ((1, 0.2), (2, 1.0))]
    assert runs[0] == runs[1]


def test_prefill_then_generate_equals_one_shot(pipe, assert_same_state):
    one_shot = pipe.stream(PROMPT, settings=GREEDY, max_tokens=5)
    list(one_shot)

    prefilled = pipe.prefill(PROMPT)
    split = pipe.stream("", prefilled, settings=GREEDY, max_tokens=5)
    list(split)

    assert split.tokens == one_shot.tokens
    assert split.text == one_shot.text
    assert_same_state(split.state, one_shot.state)


def test_chunked_prefill_keeps_the_last_logits_and_leaves_its_input_alone(pipe):
    tokens = pipe.encode(PROMPT * 2)
    start = pipe.prefill("Hello")
    start_logits = start.logits.clone()

    chunked = pipe.prefill_tokens(tokens, start, chunk_len=8)
    whole_logits, whole = pipe.model.forward(tokens, start)

    assert chunked.tokens == whole.tokens == start.tokens + len(tokens)
    assert torch.allclose(chunked.logits, whole_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(start.logits, start_logits)


def test_prefill_of_nothing_returns_the_state_given(pipe):
    start = pipe.prefill("Hi")
    assert pipe.prefill("", start) is start
    assert pipe.prefill("").logits is None  # the model's initial state: nothing fed yet


def test_empty_prompt_needs_a_prefilled_state(pipe):
    with pytest.raises(ValueError, match="empty prompt"):
        list(pipe.stream("", None, settings=GREEDY, max_tokens=2))


# ------------------------------------------------------------------ stop strings
def greedy_reference(pipe, steps: int):
    tokens, _ = argmax_loop(pipe.model, pipe.encode(PROMPT), steps)
    return tokens, [pipe.decode([token]) for token in tokens]


def two_token_stop(texts: list[str]) -> tuple[int, str, int]:
    """(k, stop, offset): a stop string made of tokens k and k+1 that first occurs at their start."""
    full = "".join(texts)
    for k in range(1, len(texts) - 1):
        stop = texts[k] + texts[k + 1]
        offset = len("".join(texts[:k]))
        clean = "\ufffd" not in "".join(texts[: k + 2])
        if clean and texts[k] and texts[k + 1] and full.find(stop) == offset:
            return k, stop, offset
    pytest.skip("no two clean consecutive tokens in the greedy text")


def test_stop_string_spanning_two_tokens_ends_the_text_before_it(pipe, assert_same_state):
    tokens, texts = greedy_reference(pipe, 10)
    k, stop, offset = two_token_stop(texts)

    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=10, stop=[stop])
    pieces = list(gen)

    assert gen.finish_reason == "stop"
    assert gen.text == "".join(pieces) == "".join(texts)[:offset]
    assert gen.tokens == tokens[: k + 2]  # the stop string's tokens are in the state...
    assert_same_state(gen.state, feed_one_by_one(pipe.model, pipe.encode(PROMPT), tokens[: k + 2]))


def test_a_possible_stop_start_is_held_back_then_released(pipe):
    tokens, texts = greedy_reference(pipe, 10)
    k, _, _ = two_token_stop(texts)
    never_completed = texts[k] + "\x01"

    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=10, stop=[never_completed])
    shown_after_token = {}
    for _ in gen:
        shown_after_token[len(gen.tokens)] = gen.text

    assert gen.finish_reason == "length"
    assert gen.text == pipe.decode(tokens)
    assert not shown_after_token.get(k + 1, "").endswith(texts[k])  # held while it could be the stop


def test_stop_string_filter_finds_stops_across_pieces():
    stops = ("\n\n", "User:")
    filt = StopStringFilter()
    assert filt.push("Hello\n", stops) == ("Hello", False)
    assert filt.push("there", stops) == ("\nthere", False)
    assert filt.push(" Us", stops) == (" ", False)
    assert filt.push("e", stops) == ("", False)
    assert filt.push("r: hi", stops) == ("", True)
    filt = StopStringFilter()
    assert filt.push("a\n", stops) == ("a", False)
    assert filt.release() == "\n"


# ------------------------------------------------------------------ scripted: UTF-8, EOS
def byte_token(tokenizer, value: int) -> int:
    return next(i for i in range(1, 1000) if tokenizer.token_bytes(i) == bytes([value]))


def test_split_utf8_is_held_back_until_the_character_is_complete(scripted, tokenizer):
    e_acute = [byte_token(tokenizer, 0xC3), byte_token(tokenizer, 0xA9)]
    script = [*e_acute, *tokenizer.encode(" ok"), byte_token(tokenizer, 0xC3)]
    prompt = tokenizer.encode("x")

    def token_rule(history):
        position = len(history) - len(prompt)
        return script[position] if position < len(script) else 0

    pipe = scripted(token_rule=token_rule)
    gen = pipe.stream("x", settings=GREEDY, token_ban=[], max_tokens=20)
    seen = [(piece, len(gen.tokens)) for piece in gen]

    assert seen[0] == ("é", 2)  # nothing shown after the first byte
    assert "".join(piece for piece, _ in seen) == "é ok\ufffd"  # a byte that never completed
    assert gen.finish_reason == "eos"
    assert gen.tokens == script and 0 not in gen.state.history  # end-of-text is not fed


def test_banned_tokens_are_never_drawn(scripted, tokenizer):
    pipe = scripted(lambda text: "abc", runner_up=tokenizer.encode("z")[0])
    favourite = tokenizer.encode("abc")[0]
    gen = pipe.stream("x", settings=GREEDY, token_ban=[0, favourite], max_tokens=3)
    list(gen)
    assert favourite not in gen.tokens
    assert gen.text == "zzz"


def test_token_ban_applies_to_a_real_model(pipe):
    tokens, _ = greedy_reference(pipe, 4)
    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=4, token_ban=[0, *tokens])
    list(gen)
    assert not set(gen.tokens) & set(tokens)


# ------------------------------------------------------------------ sampling
def test_top_p_one_draws_tokens_other_than_the_top_one(pipe):
    gen = pipe.stream(PROMPT, settings=SAMPLED, max_tokens=12, seed=5)
    list(gen)
    best = argmax_at_each_step(pipe.model, pipe.encode(PROMPT), gen.tokens)
    assert any(token != top for token, top in zip(gen.tokens, best))


def test_seeded_runs_repeat_and_other_seeds_differ(pipe):
    first = pipe.stream(PROMPT, settings=SAMPLED, max_tokens=8, seed=123)
    again = pipe.stream(PROMPT, settings=SAMPLED, max_tokens=8, seed=123)
    other = pipe.stream(PROMPT, settings=SAMPLED, max_tokens=8, seed=124)
    for gen in (first, again, other):
        list(gen)
    assert first.tokens == again.tokens and first.text == again.text
    assert other.tokens != first.tokens


def test_a_live_settings_change_applies_from_the_next_token(pipe):
    greedy = GREEDY.replace(max_tokens=14)
    hot = SAMPLED.replace(max_tokens=14)
    top_one = SAMPLED.replace(max_tokens=14, top_k=1, temperature=2.0)

    def current_settings():
        made = len(gen.tokens)
        return greedy if made < 4 else hot if made < 9 else top_one

    gen = pipe.stream(PROMPT, settings=current_settings)
    list(gen)

    assert len(gen.tokens) == 14
    best = argmax_at_each_step(pipe.model, pipe.encode(PROMPT), gen.tokens)
    matches = [token == top for token, top in zip(gen.tokens, best)]
    assert all(matches[:4])  # temperature 0
    assert not all(matches[4:9])  # temperature 1, top_p 1: not greedy
    assert all(matches[9:])  # top_k 1: greedy again


def test_lowering_max_tokens_mid_stream_ends_it(pipe):
    current = [GREEDY.replace(max_tokens=50)]
    gen = pipe.stream(PROMPT, settings=lambda: current[0])
    for _ in gen:
        if len(gen.tokens) == 2:
            current[0] = current[0].replace(max_tokens=3)
    assert gen.finish_reason == "length" and len(gen.tokens) == 3


@pytest.mark.parametrize(
    ("wish", "penalties", "expected"),
    [
        ("a", dict(presence=4.0), "azaa"),  # "a" 8 - 4 < "z" 5, then "z" 5 - 4 < "a" 4
        ("a", dict(frequency=2.0, penalty_decay=1.0), "aazaz"),  # a 8, 6, 4 < z 5; z 3 < a 4; a 2 < z 3
        (" ", dict(frequency=2.0, penalty_decay=1.0), "     "),  # spaces add nothing to the count
    ],
)
def test_presence_and_frequency_penalties(scripted, tokenizer, wish, penalties, expected):
    pipe = scripted(lambda text: wish, runner_up=tokenizer.encode("z")[0])
    text, _ = pipe.generate("x", settings=GREEDY, max_tokens=len(expected), **penalties)
    assert text == expected


# ------------------------------------------------------------------ cancel
def test_cancel_mid_stream_keeps_the_text_and_a_matching_state(pipe, assert_same_state):
    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=40)
    cancelled_at = None
    for _ in gen:
        if cancelled_at is None and len(gen.tokens) >= 4:
            cancelled_at = len(gen.tokens)
            gen.cancel()

    assert gen.finish_reason == "cancelled"
    assert len(gen.tokens) == cancelled_at
    assert gen.text == pipe.decode(gen.tokens)
    assert_same_state(gen.state, feed_one_by_one(pipe.model, pipe.encode(PROMPT), gen.tokens))


def test_cancel_from_another_thread(pipe, assert_same_state):
    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=200)
    pieces = []
    worker = threading.Thread(target=lambda: pieces.extend(gen))
    worker.start()
    deadline = time.monotonic() + 60
    while len(gen.tokens) < 3 and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.005)
    gen.cancel()
    worker.join(60)

    assert not worker.is_alive()
    assert gen.finish_reason == "cancelled" and 3 <= len(gen.tokens) < 200
    assert "".join(pieces) == gen.text == pipe.decode(gen.tokens)
    assert_same_state(gen.state, feed_one_by_one(pipe.model, pipe.encode(PROMPT), gen.tokens))


def test_closing_the_iterator_cancels(pipe, assert_same_state):
    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=40)
    next(gen)
    next(gen)
    gen.close()
    assert gen.finish_reason == "cancelled"
    assert list(gen) == []
    assert_same_state(gen.state, feed_one_by_one(pipe.model, pipe.encode(PROMPT), gen.tokens))


def test_cancel_before_the_first_token_still_prefills(pipe):
    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=5)
    gen.cancel()
    assert list(gen) == []
    assert gen.finish_reason == "cancelled" and gen.tokens == []
    assert gen.state.tokens == len(pipe.encode(PROMPT))


# ------------------------------------------------------------------ stats and arguments
def test_stats_count_prompt_and_generated_tokens(pipe):
    gen = pipe.stream(PROMPT, settings=GREEDY, max_tokens=5)
    assert gen.stats.generated_tokens == 0
    list(gen)
    stats = gen.stats
    assert stats.prompt_tokens == len(pipe.encode(PROMPT))
    assert stats.generated_tokens == 5
    assert 0 < stats.time_to_first_token <= stats.seconds
    assert stats.tokens_per_second > 0


def test_unknown_or_invalid_overrides_fail_at_once(pipe):
    with pytest.raises(ValueError, match="unknown sampling setting"):
        pipe.stream(PROMPT, temprature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        pipe.stream(PROMPT, settings=lambda: GREEDY, top_p=2.0)
    with pytest.raises(TypeError):
        pipe.stream(PROMPT, settings={"temperature": 0})


def test_generation_is_lazy(scripted):
    pipe = scripted(lambda text: "a")
    gen = pipe.stream("hello", settings=GREEDY, max_tokens=2)
    assert isinstance(gen, Generation) and pipe.model.forward_calls == 0
    list(gen)
    assert pipe.model.forward_calls == 3  # the prompt, then one call per token


def test_default_tokenizer_is_the_world_tokenizer(load_model):
    assert Pipeline(load_model("7")).encode("\n\n") == [261]


def test_decode_steps_hold_the_single_token_thread_settings(pipe, monkeypatch):
    """Sampling runs inside the model's decode settings (torch on one thread next to the CPU
    kernels' own threads), and the caller's setting is back between pieces and afterwards."""
    from rwkv_chat.engine import cpu_kernels
    from rwkv_chat.sampling import Sampler

    if cpu_kernels.get() is None:
        pytest.skip("the CPU kernels could not be built here")
    seen = []
    original = Sampler.sample

    def spy(self, logits, settings):
        seen.append(torch.get_num_threads())
        return original(self, logits, settings)

    monkeypatch.setattr(Sampler, "sample", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        between = []
        for _ in pipe.stream(PROMPT, settings=GREEDY.replace(max_tokens=6)):
            between.append(torch.get_num_threads())
        assert seen and set(seen) == {1}
        assert set(between) == {2} and torch.get_num_threads() == 2
        generation = pipe.stream(PROMPT, settings=GREEDY.replace(max_tokens=50))
        next(generation)
        generation.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------ two generations at once
@pytest.mark.parametrize("version", ["5.2", "7"])
def test_two_generations_at_once_on_one_model_match_sequential_runs(make_pipeline, version, assert_same_state):
    """Two threads decode on one model in lockstep (a barrier before every sampled token), one
    greedy and one sampled: each gets exactly what it gets alone, and torch's thread setting
    (which single-token decoding changes for its duration) is back afterwards."""
    pipe = make_pipeline(version)
    jobs = [("User: tell me a story\n\nAssistant:", GREEDY.replace(max_tokens=12)),
            ("Once upon a time", SAMPLED.replace(max_tokens=12, seed=5))]
    alone = [pipe.generate(prompt, settings=settings) for prompt, settings in jobs]
    threads_before = torch.get_num_threads()

    barrier = threading.Barrier(len(jobs), timeout=5)

    def in_lockstep(settings):
        def read():
            try:
                barrier.wait()
            except threading.BrokenBarrierError:  # the other one has finished: go on alone
                pass
            return settings

        return read

    results: list = [None] * len(jobs)
    errors = []

    def run(index):
        prompt, settings = jobs[index]
        try:
            results[index] = pipe.generate(prompt, settings=in_lockstep(settings))
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)
        finally:
            barrier.abort()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors and not any(worker.is_alive() for worker in workers)
    for (text, state), (want_text, want_state) in zip(results, alone):
        assert text == want_text
        assert_same_state(state, want_state)
    assert torch.get_num_threads() == threads_before
