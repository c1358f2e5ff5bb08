"""rwkv_chat.compat.utils against the oracle `rwkv` 0.8.32: the same np.random.seed and the same
logits give the same tokens from `sample_logits`; PIPELINE_ARGS, refine_context and decode match."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkv_chat.compat.utils import PIPELINE, PIPELINE_ARGS, UnsupportedVocabError

oracle_utils = pytest.importorskip("rwkv.utils")  # the oracle package (a test dependency)


def oracle_pipeline():
    return oracle_utils.PIPELINE.__new__(oracle_utils.PIPELINE)  # sampling needs no tokenizer


def our_pipeline():
    return PIPELINE.__new__(PIPELINE)


def logits_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = 65536
    cases = {f"gauss x{scale}": torch.randn(vocab, generator=g) * scale for scale in (0.5, 4.0, 12.0)}
    cases["rounded (many ties)"] = (torch.randn(vocab, generator=g) * 2).round()
    banned = torch.randn(vocab, generator=g) * 3
    banned[::3] = -float("inf")
    cases["a third banned"] = banned
    flat = torch.zeros(vocab)
    flat[:40] = 0.01 * torch.arange(40)
    cases["nearly flat"] = flat  # the top-p cutoff lies far beyond the few hundred largest
    return cases


# (temperature, top_p, top_k): defaults, greedy (T=0), top_p 0 and the 1.0 collapse, top-k of
# 1/8/50, top-k beyond the few hundred largest (600) and beyond the vocabulary
SETTINGS = [
    (1.0, 0.85, 0), (1.0, 0.3, 0), (0.6, 0.3, 0), (1.6, 0.85, 0), (0, 0.3, 0), (1.0, 0, 0),
    (1.0, 1.0, 0), (1.3, 0.999, 0), (0.7, 0.85, 1), (1.0, 0.85, 8), (0.5, 1.0, 50),
    (1.0, 0.85, 600), (1.0, 0.5, 70000),
]


@pytest.mark.parametrize("case", list(logits_cases()))
def test_sample_logits_draws_the_oracles_tokens(case):
    logits = logits_cases()[case]
    oracle, ours = oracle_pipeline(), our_pipeline()
    for number, (temperature, top_p, top_k) in enumerate(SETTINGS):
        np.random.seed(number)
        expected = [oracle.sample_logits(logits.clone(), temperature, top_p, top_k) for _ in range(2)]
        np.random.seed(number)
        got = [ours.sample_logits(logits.clone(), temperature, top_p, top_k) for _ in range(2)]
        assert got == expected, (case, temperature, top_p, top_k)


def test_sample_logits_leaves_numpys_stream_where_the_oracle_does():
    logits = logits_cases()["gauss x4.0"]
    np.random.seed(11)
    oracle_pipeline().sample_logits(logits.clone(), 1.0, 0.5, 0)
    after_oracle = np.random.random()
    np.random.seed(11)
    our_pipeline().sample_logits(logits.clone(), 1.0, 0.5, 0)
    assert np.random.random() == after_oracle


def test_sample_logits_does_not_change_the_callers_logits():
    logits = logits_cases()["gauss x4.0"]
    before = logits.clone()
    our_pipeline().sample_logits(logits, 0.7, 0.5, 5)
    assert torch.equal(logits, before)


def test_pipeline_args_fields_and_defaults_match():
    assert vars(PIPELINE_ARGS()) == vars(oracle_utils.PIPELINE_ARGS())
    custom = dict(temperature=1.5, top_p=0.3, top_k=7, alpha_frequency=0.1, alpha_presence=0.3,
                  alpha_decay=0.99, token_ban=[0], token_stop=[11], chunk_len=64)
    assert vars(PIPELINE_ARGS(**custom)) == vars(oracle_utils.PIPELINE_ARGS(**custom))
    assert vars(PIPELINE_ARGS(1.2, 0.5, 3)) == vars(oracle_utils.PIPELINE_ARGS(1.2, 0.5, 3))  # positional order


@pytest.mark.parametrize("text", ["", "\n\n", "  hello \r\n\n  world\u3000 \n", "a\n\n\nb", "\u3000x\u3000"])
def test_refine_context_matches(text):
    assert our_pipeline().refine_context(text) == oracle_pipeline().refine_context(text)


def test_world_vocab_round_trip_and_broken_utf8_as_in_0_8_32():
    pipeline = PIPELINE(None, "rwkv_vocab_v20230424")
    assert pipeline.encode("\n\n") == [261] and pipeline.encode("\n") == [11]
    text = "User: 中文 and English\n\nAssistant:"
    assert pipeline.decode(pipeline.encode(text)) == text
    assert pipeline.decode([229]) == "\ufffd"  # b"\xe4" alone: 0.8.32 gives one U+FFFD for broken UTF-8
    assert pipeline.decode([229, 1131]) == "\ufffd"  # not "\ufffdIg": the whole text is replaced
    with pytest.raises(ValueError, match="empty string"):
        pipeline.generate("", token_count=3)  # 0.8.32 fails here with UnboundLocalError


def test_other_vocabularies_are_refused_clearly():
    with pytest.raises(UnsupportedVocabError, match="20B_tokenizer.json"):
        PIPELINE(None, "20B_tokenizer.json")
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedVocabError, match="pip install tiktoken"):
            PIPELINE(None, "cl100k_base")
