"""SamplingSettings validation and the Sampler, checked against ChatRWKV's rwkv 0.8.32 where it matters."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from rwkv_chat.sampling import END_OF_TEXT, Sampler, SamplingSettings, penalty_weight

PLAIN = dict(presence=0.0, frequency=0.0, token_ban=())  # settings without penalties or bans


def random_logits(vocab: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw_many(logits: torch.Tensor, settings: SamplingSettings, count: int, seed: int = 0) -> list[int]:
    sampler = Sampler(seed)
    return [sampler.sample(logits, settings) for _ in range(count)]


# --------------------------------------------------------------------------- settings


def test_defaults_are_chatrwkv_chat_values():
    settings = SamplingSettings()
    assert (settings.temperature, settings.top_p, settings.top_k) == (1.0, 0.3, 0)
    assert (settings.presence, settings.frequency, settings.penalty_decay) == (0.5, 0.5, 0.996)
    assert settings.max_tokens == 256 and settings.seed is None
    assert settings.token_ban == (END_OF_TEXT,) and settings.stop == ()


@pytest.mark.parametrize(
    ("field", "bad", "range_text"),
    [
        ("temperature", -0.1, "from 0 to 5"),
        ("temperature", 5.5, "from 0 to 5"),
        ("temperature", float("nan"), "from 0 to 5"),
        ("temperature", "hot", "from 0 to 5"),
        ("top_p", 0.0, "greater than 0 and at most 1"),
        ("top_p", 1.01, "greater than 0 and at most 1"),
        ("top_k", -1, "integer >= 0"),
        ("top_k", 2.5, "integer >= 0"),
        ("top_k", True, "integer >= 0"),
        ("presence", 5.1, "from -5 to 5"),
        ("frequency", -6, "from -5 to 5"),
        ("frequency", float("inf"), "from -5 to 5"),
        ("penalty_decay", 0.0, "greater than 0 and at most 1"),
        ("penalty_decay", 1.5, "greater than 0 and at most 1"),
        ("max_tokens", 0, "integer >= 1"),
        ("max_tokens", 10.0, "integer >= 1"),
        ("seed", -1, "0 to 2**64 - 1"),
        ("seed", 2**64, "0 to 2**64 - 1"),
        ("seed", 1.5, "0 to 2**64 - 1"),
        ("token_ban", (1, -2), "integers >= 0"),
        ("token_ban", 5, "integers >= 0"),
        ("token_ban", "0", "integers >= 0"),
        ("stop", "\n\n", "wrap it in a list"),
        ("stop", ("ok", ""), "non-empty strings"),
        ("stop", (1,), "non-empty strings"),
    ],
)
def test_invalid_values_are_refused_naming_field_and_range(field, bad, range_text):
    with pytest.raises(ValueError, match=rf"^{field} must .*{re.escape(range_text)}"):
        SamplingSettings(**{field: bad})
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingSettings().replace(**{field: bad})


def test_values_are_normalised():
    settings = SamplingSettings(temperature=1, presence=0, token_ban=[0, 11], stop=["\n\n"])
    assert isinstance(settings.temperature, float) and isinstance(settings.presence, float)
    assert settings.token_ban == (0, 11) and settings.stop == ("\n\n",)
    assert hash(settings) == hash(SamplingSettings(temperature=1.0, presence=0.0, token_ban=(0, 11), stop=("\n\n",)))


def test_replace_validates_and_refuses_unknown_fields():
    settings = SamplingSettings().replace(top_k=40, seed=7)
    assert (settings.top_k, settings.seed) == (40, 7)
    with pytest.raises(ValueError, match="unknown sampling setting.*'top_q'"):
        SamplingSettings().replace(top_q=0.5)


def test_dict_round_trip_is_json_safe():
    settings = SamplingSettings(temperature=0.7, top_k=5, seed=123, token_ban=(0, 261), stop=("\n\nUser:",))
    data = json.loads(json.dumps(settings.to_dict()))
    assert SamplingSettings.from_dict(data) == settings
    assert data["token_ban"] == [0, 261]


def test_from_dict_fills_missing_keys_and_refuses_unknown_ones():
    assert SamplingSettings.from_dict({"top_p": 0.5}) == SamplingSettings(top_p=0.5)
    with pytest.raises(ValueError, match="unknown sampling setting.*'alpha_decay'.*known: temperature"):
        SamplingSettings.from_dict({"top_p": 0.5, "alpha_decay": 0.9})
    with pytest.raises(ValueError, match="mapping"):
        SamplingSettings.from_dict([("top_p", 0.5)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^top_p must"):
        SamplingSettings.from_dict({"top_p": 2})


def test_nudge_rounds_clamps_and_refuses_non_numeric_fields():
    settings = SamplingSettings(top_p=0.2)
    assert settings.nudge("top_p", 0.1).top_p == 0.3  # not 0.30000000000000004
    assert SamplingSettings(temperature=0.1).nudge("temperature", 0.2).temperature == 0.3
    assert settings.nudge("top_p", 5).top_p == 1.0
    assert settings.nudge("top_p", -5).top_p == 0.01  # open lower bound: one step above 0
    assert SamplingSettings(temperature=0.1).nudge("temperature", -1).temperature == 0.0
    assert SamplingSettings(presence=4.9).nudge("presence", 0.5).presence == 5.0
    assert SamplingSettings().nudge("penalty_decay", 0.001).penalty_decay == 0.997
    assert SamplingSettings().nudge("penalty_decay", 1).penalty_decay == 1.0
    assert SamplingSettings().nudge("top_k", -3).top_k == 0
    assert SamplingSettings(top_k=3).nudge("top_k", 2).top_k == 5
    assert SamplingSettings().nudge("max_tokens", -1000).max_tokens == 1
    # a value set below the nudge grid is not pushed up by a downward nudge
    assert SamplingSettings(top_p=0.001).nudge("top_p", -0.05).top_p == 0.001
    with pytest.raises(ValueError, match="'seed' cannot be nudged"):
        SamplingSettings().nudge("seed", 1)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        SamplingSettings().nudge("top_k", 0.5)
    with pytest.raises(ValueError, match="finite number"):
        SamplingSettings().nudge("temperature", float("nan"))


# --------------------------------------------------------------------------- penalty_weight


def test_penalty_weight_matches_chatrwkv_for_every_single_character():
    for code in list(range(0x20, 0x7F)) + [0x09, 0x0A, 0x0D, 0x3000, 0x4E2D, 0xFF10, 0xFFFD]:
        char = chr(code)
        chatrwkv = 0.0 if char in " \t0123456789" else 1.0  # its substring test
        assert penalty_weight(char) == chatrwkv, repr(char)


def test_penalty_weight_exempts_every_all_space_tab_digit_token():
    # ChatRWKV's substring test exempts '01' but not '00' or '  ': we exempt all of them (documented).
    for text in ("01", "00", "  ", "\t\t", " 1", "2024", "    ", ""):
        assert penalty_weight(text) == 0.0, repr(text)
    for text in ("a1", " x", "1.5", "\n", "\n\n", "١", "\ufffd"):  # Arabic-Indic digit is not ASCII
        assert penalty_weight(text) == 1.0, repr(text)
    assert penalty_weight(b" 12") == 0.0 and penalty_weight(b"\xe4") == 1.0


# --------------------------------------------------------------------------- penalties


def test_penalised_subtracts_presence_plus_frequency_times_decayed_count():
    logits = random_logits(20)
    settings = SamplingSettings(presence=0.4, frequency=0.7, penalty_decay=0.5, token_ban=(3,))
    sampler = Sampler(0)
    sampler.record(5, 1.0, penalty_decay=0.5)  # count 5: 1
    sampler.record(5, 1.0, penalty_decay=0.5)  # count 5: 1*0.5 + 1 = 1.5
    sampler.record(9, 0.0, penalty_decay=0.5)  # 5: 0.75, 9: 0 but present
    sampler.record(7, 1.0, penalty_decay=0.5)  # 5: 0.375, 9: 0, 7: 1
    expected = logits.clone()
    expected[5] -= 0.4 + 0.7 * 0.375
    expected[9] -= 0.4
    expected[7] -= 0.4 + 0.7 * 1.0
    expected[3] = -math.inf
    torch.testing.assert_close(sampler.penalised(logits, settings), expected)
    assert not torch.equal(logits, expected), "penalised must not modify the caller's logits"


def test_penalty_bookkeeping_matches_chatrwkv_generate():
    """Run rwkv.utils.PIPELINE.generate on a fake model that always returns the same logits, capture
    the penalised logits it hands to sample_logits, and replay the same tokens through our Sampler."""
    oracle = pytest.importorskip("rwkv.utils")
    texts = ["<eot>", "Hello", " world", "!", " ", "7", "\n\n", "00", "ab", "zz"]
    base = random_logits(len(texts), scale=2.0, seed=3)
    script = [1, 2, 1, 4, 1, 5, 2, 4, 8, 1, 5, 6, 1]

    class FixedModel:
        def forward(self, tokens, state):
            return base.clone(), state  # the oracle edits the returned logits in place

    class ListVocab:  # a name containing "Tokenizer" would switch the oracle to its HF path
        def encode(self, text):
            return [1]

        def decode(self, ids):
            return "".join(texts[i] for i in ids)

    pipeline = oracle.PIPELINE.__new__(oracle.PIPELINE)
    pipeline.model, pipeline.tokenizer = FixedModel(), ListVocab()
    seen_by_oracle: list[torch.Tensor] = []
    upcoming = iter(script)

    def scripted_sample_logits(logits, **_):
        seen_by_oracle.append(logits.clone())
        return next(upcoming)

    pipeline.sample_logits = scripted_sample_logits
    args = oracle.PIPELINE_ARGS(alpha_presence=0.4, alpha_frequency=0.7, alpha_decay=0.9, token_ban=[0, 9])
    pipeline.generate("prompt", token_count=len(script), args=args)
    assert len(seen_by_oracle) == len(script)

    settings = SamplingSettings(presence=0.4, frequency=0.7, penalty_decay=0.9, token_ban=(0, 9))
    sampler = Sampler(0)
    for step, token in enumerate(script):
        torch.testing.assert_close(sampler.penalised(base, settings), seen_by_oracle[step], atol=1e-5, rtol=0)
        sampler.record(token, penalty_weight(texts[token]), penalty_decay=settings.penalty_decay)


def test_bad_token_ids_are_refused():
    logits = random_logits(10)
    with pytest.raises(ValueError, match="token_ban id 10 is outside the vocabulary of 10"):
        Sampler(0).sample(logits, SamplingSettings(token_ban=(10,)))
    sampler = Sampler(0)
    sampler.record(12, 1.0, penalty_decay=0.9)
    with pytest.raises(ValueError, match="outside the vocabulary of 10"):
        sampler.sample(logits, SamplingSettings())
    with pytest.raises(ValueError, match="token_id"):
        sampler.record(-1, 1.0, penalty_decay=0.9)
    with pytest.raises(ValueError, match="penalty_decay"):
        sampler.record(1, 1.0, penalty_decay=0.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        sampler.sample(logits.reshape(2, 5), SamplingSettings())


# --------------------------------------------------------------------------- sampling


def test_temperature_zero_is_argmax_of_penalised_logits():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.0])
    greedy = SamplingSettings(temperature=0, presence=0.5, frequency=0.0, token_ban=())
    sampler = Sampler(0)
    assert sampler.sample(logits, greedy) == 1
    sampler.record(1, 1.0, penalty_decay=1.0)  # 3.0 - 0.5 < 2.9
    assert sampler.sample(logits, greedy) == 2
    assert sampler.sample(logits, greedy.replace(token_ban=(2,))) == 1
    assert torch.equal(sampler.probabilities(logits, greedy), torch.tensor([0.0, 0, 1, 0, 0]))


def test_everything_banned_is_an_error_not_a_crash():
    with pytest.raises(ValueError, match="every token is banned"):
        Sampler(0).sample(torch.zeros(3), SamplingSettings(token_ban=(0, 1, 2)))
    with pytest.raises(ValueError, match="every token is banned"):
        Sampler(0).sample(torch.zeros(3), SamplingSettings(temperature=0, token_ban=(0, 1, 2)))


def test_top_p_one_samples_the_whole_distribution():
    logits = random_logits(1000, scale=0.3)  # ChatRWKV collapses this one to greedy (see below)
    settings = SamplingSettings(top_p=1.0, **PLAIN)
    assert bool((Sampler(0).probabilities(logits, settings) > 0).all())
    draws = draw_many(logits, settings, 300)
    assert len(set(draws)) > 200 and any(d != int(logits.argmax()) for d in draws)


def test_chatrwkv_top_p_one_collapse_is_not_repeated(monkeypatch):
    oracle = pytest.importorskip("rwkv.utils")
    logits = random_logits(1000, scale=0.3)
    probs = torch.softmax(logits, 0).numpy()
    assert np.cumsum(np.sort(probs)[::-1])[-1] < 1.0  # float32 sum never reaches top_p = 1.0
    oracle_probs = capture_oracle_distribution(oracle, monkeypatch, logits, temperature=1.0, top_p=1.0, top_k=0)
    assert np.count_nonzero(oracle_probs) == 1  # the oracle's bug
    ours = Sampler(0).probabilities(logits, SamplingSettings(top_p=1.0, **PLAIN))
    assert int((ours > 0).sum()) == 1000


def test_small_top_p_keeps_only_the_top_token():
    logits = random_logits(500, scale=2.0)
    settings = SamplingSettings(top_p=0.01, **PLAIN)
    assert set(draw_many(logits, settings, 50)) == {int(logits.argmax())}


def test_top_p_keeps_ties_at_the_cutoff():
    logits = torch.full((1000,), -5.0)
    logits[[10, 20, 30]] = 3.0
    probabilities = Sampler(0).probabilities(logits, SamplingSettings(top_p=0.05, **PLAIN))
    assert set(torch.nonzero(probabilities).flatten().tolist()) == {10, 20, 30}
    logits[:300] = 4.0  # ties reaching past the first few hundred candidates
    probabilities = Sampler(0).probabilities(logits, SamplingSettings(top_p=0.01, **PLAIN))
    assert set(torch.nonzero(probabilities).flatten().tolist()) == set(range(300))


@pytest.mark.parametrize("top_p", [0.5, 0.85, 0.99])
def test_deep_top_p_cutoff_in_a_flat_vocabulary_matches_a_full_sort(top_p):
    logits = random_logits(65536, scale=0.5, seed=11)
    probs = torch.softmax(logits, 0)
    ordered = torch.sort(probs, descending=True).values
    cutoff = ordered[int(torch.searchsorted(ordered.cumsum(0, dtype=torch.float64), top_p))]
    kept = Sampler(0).probabilities(logits, SamplingSettings(top_p=top_p, **PLAIN)) > 0
    assert torch.equal(kept, probs >= cutoff)


def test_top_k_one_is_argmax_and_top_k_five_keeps_five():
    logits = random_logits(300, scale=0.5)
    assert set(draw_many(logits, SamplingSettings(top_k=1, top_p=1.0, **PLAIN), 30)) == {int(logits.argmax())}
    top_five = set(torch.topk(logits, 5).indices.tolist())
    draws = draw_many(logits, SamplingSettings(top_k=5, top_p=1.0, **PLAIN), 500)
    assert set(draws) == top_five


def test_temperature_widens_and_narrows_the_spread():
    logits = random_logits(50, scale=2.0)

    def entropy(temperature: float) -> float:
        draws = draw_many(logits, SamplingSettings(temperature=temperature, top_p=1.0, **PLAIN), 1500)
        counts = np.bincount(draws, minlength=50) / len(draws)
        counts = counts[counts > 0]
        return float(-(counts * np.log(counts)).sum())

    assert entropy(0.5) < entropy(1.0) < entropy(2.0)


def test_draws_follow_the_reported_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    settings = SamplingSettings(temperature=1.3, top_p=0.9, **PLAIN)
    expected = Sampler(0).probabilities(logits, settings)
    draws = draw_many(logits, settings, 4000, seed=5)
    observed = torch.bincount(torch.tensor(draws), minlength=6) / len(draws)
    assert float((observed - expected).abs().max()) < 0.03
    assert float(expected[5]) == 0.0 and 5 not in draws  # cut by top-p


def test_banned_tokens_are_never_drawn():
    logits = random_logits(40, scale=0.3)
    banned = tuple(torch.topk(logits, 5).indices.tolist())
    draws = draw_many(logits, SamplingSettings(top_p=1.0, presence=0.0, frequency=0.0, token_ban=banned), 400)
    assert not set(draws) & set(banned)


def capture_oracle_distribution(oracle, monkeypatch, logits, **kwargs) -> np.ndarray:
    """The probability vector ChatRWKV's CPU sample_logits hands to np.random.choice."""
    captured = {}

    def fake_choice(a, p):
        captured["p"] = np.asarray(p, dtype=np.float64)
        return 0

    monkeypatch.setattr(oracle.np.random, "choice", fake_choice)
    oracle.PIPELINE.sample_logits(None, logits.clone(), **kwargs)
    monkeypatch.undo()
    return captured["p"]


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("top_k", [0, 1, 4, 60])
def test_distribution_matches_chatrwkv_sample_logits(monkeypatch, temperature, top_p, top_k):
    oracle = pytest.importorskip("rwkv.utils")
    logits = random_logits(512, scale=2.5, seed=int(top_p * 10) + top_k)
    expected = capture_oracle_distribution(oracle, monkeypatch, logits, temperature=temperature, top_p=top_p, top_k=top_k)
    settings = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, **PLAIN)
    ours = Sampler(0).probabilities(logits, settings).double().numpy()
    np.testing.assert_array_equal(ours > 0, expected > 0)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_sampling_leaves_the_logits_untouched():
    logits = random_logits(100)
    before = logits.clone()
    sampler = Sampler(0)
    sampler.record(3, 1.0, penalty_decay=0.9)
    sampler.sample(logits, SamplingSettings(token_ban=(0, 1)))
    assert torch.equal(logits, before)


# --------------------------------------------------------------------------- seeding


def generate_with(sampler: Sampler, steps: int = 40) -> list[int]:
    settings = SamplingSettings(top_p=0.9, frequency=0.3)
    tokens = []
    for step in range(steps):
        token = sampler.sample(random_logits(200, scale=1.0, seed=step), settings)
        sampler.record(token, 1.0, penalty_decay=settings.penalty_decay)
        tokens.append(token)
    return tokens


def test_same_seed_repeats_and_different_seeds_differ():
    first = generate_with(Sampler(seed=42))
    assert generate_with(Sampler(seed=42)) == first
    assert generate_with(Sampler(seed=43)) != first


def test_unseeded_sampler_reports_a_seed_that_reproduces_it():
    sampler = Sampler()
    tokens = generate_with(sampler)
    assert generate_with(Sampler(seed=sampler.seed)) == tokens
    with pytest.raises(ValueError, match="seed"):
        Sampler(seed=-5)


def test_sampling_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate_with(Sampler(seed=1), steps=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("temperature", [0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("ban", [(), (3,)])
def test_broken_logits_are_an_error_whatever_the_settings(temperature, bad, ban):
    """A NaN or +inf logit means the model or its state is broken: an error naming them, greedy or
    not, with bans and penalties or without (a ban on that very token hides nothing)."""
    logits = torch.zeros(1000)
    logits[[3, 500]] = bad
    sampler = Sampler(0)
    sampler.record(7, 1.0, penalty_decay=1.0)
    for presence in (0.0, 0.5):
        settings = SamplingSettings(temperature=temperature, presence=presence, frequency=0.0, token_ban=ban)
        with pytest.raises(ValueError, match="2 NaN or \\+infinite value"):
            sampler.sample(logits, settings)
    with pytest.raises(ValueError, match="every logit is -inf"):
        sampler.sample(torch.full((10,), -math.inf), SamplingSettings(temperature=temperature, presence=0.0,
                                                                   frequency=0.0, token_ban=()))


def test_greedy_leaves_the_logits_alone():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.0])
    kept = logits.clone()
    sampler = Sampler(0)
    for settings in (SamplingSettings(temperature=0, presence=0.0, frequency=0.0, token_ban=()),
                     SamplingSettings(temperature=0, presence=0.5, frequency=0.5, token_ban=(1,))):
        sampler.sample(logits, settings)
        sampler.record(1, 1.0, penalty_decay=0.9)
        assert torch.equal(logits, kept)
