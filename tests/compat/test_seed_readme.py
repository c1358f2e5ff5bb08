"""The seed project's (new_rwkv_pip) README snippets run verbatim, and its spellings behave as
documented: `states=` for `state=`, `gen_len=` for `max_tokens=` (a blank line ends the reply
unless a stop is given), a `GenerationResult` passed back as `states=`, the `Pipline` name."""
from __future__ import annotations

import os

import pytest
import torch

from rwkv_chat import RWKV, GenerationResult, Pipeline, Pipline
from rwkv_chat.engine.state import RWKVState

# Verbatim from the seed README, sections 1-3 (its section 2 names the pipeline `pipline`,
# section 3 `pipeline`: the test binds both names to the same object between the two).
README_ENV = '''
os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "1"
os.environ["RWKV_DML_ON"] = "1"
'''
README_LOAD = '''
model = RWKV(model_path=MODEL_PATH, strategy=strategy)
pipline = Pipline(model)
'''
README_USE = '''
states = pipeline.prefill(
    "User: hi\\n\\nAssistant: Hello, I am your AI Assistant. Are your question?\\n\\n",
    states=None
)
states = pipeline.generate(
    "User: hi\\n\\nAssistant:",
    gen_len=4096,
    states=None,
    temperature=1.0,
    top_p=0.3,
    top_k=0,
    presence=0.5,
    frequency=0.5,
    penalty_decay=0.996
)
'''


@pytest.fixture
def seed_env(monkeypatch):
    for name in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_DML_ON"):
        monkeypatch.setenv(name, "0")  # restored after the test, whatever the snippet sets


def test_readme_snippets_run_verbatim(talkative_v7, seed_env):
    namespace = {"os": os, "RWKV": RWKV, "Pipline": Pipline, "MODEL_PATH": str(talkative_v7), "strategy": "cpu fp32"}
    exec(README_ENV, namespace)
    assert os.environ["RWKV_CUDA_ON"] == "1"
    exec(README_LOAD, namespace)
    namespace["pipeline"] = namespace["pipline"]
    exec(README_USE, namespace)
    result = namespace["states"]
    assert isinstance(result, GenerationResult)
    text, state = result
    assert isinstance(state, RWKVState) and "\n\n" not in text
    pipe = namespace["pipeline"]
    prompt_tokens = len(pipe.encode("User: hi\n\nAssistant:"))
    assert prompt_tokens < state.tokens < prompt_tokens + 4096  # ended at the blank line, long before gen_len
    # and the conversation continues from the returned value, passed back whole
    more = pipe.generate("\n\nUser: and then?\n\nAssistant:", gen_len=16, states=result, seed=3)
    assert more.state.tokens > state.tokens


@pytest.fixture(scope="module")
def pipe(talkative_v7) -> Pipeline:
    return Pipeline(RWKV(talkative_v7, strategy="cpu fp32", progress=None))


def test_prefill_states_alias_continues_the_given_state(pipe):
    first = pipe.prefill("User: hi\n\n")
    by_alias = pipe.prefill("Assistant: yes", states=first)
    by_name = pipe.prefill("Assistant: yes", state=first)
    from_scratch = pipe.prefill_tokens(pipe.encode("User: hi\n\n") + pipe.encode("Assistant: yes"))
    assert by_alias.tokens == by_name.tokens == from_scratch.tokens
    torch.testing.assert_close(by_alias.logits, from_scratch.logits)
    torch.testing.assert_close(by_alias.logits, by_name.logits, rtol=0, atol=0)


def test_a_result_passed_back_continues_like_its_state(pipe):
    result = pipe.generate("User: hi\n\nAssistant:", max_tokens=5, seed=1, stop=["@@"])
    again = pipe.generate("\n\nUser: more\n\nAssistant:", states=result, max_tokens=5, seed=2, stop=["@@"])
    same = pipe.generate("\n\nUser: more\n\nAssistant:", state=result.state, max_tokens=5, seed=2, stop=["@@"])
    assert again.text == same.text and again.state.tokens == same.state.tokens == result.state.tokens + 5 + len(
        pipe.encode("\n\nUser: more\n\nAssistant:")
    )
    text, state = result  # still unpacks like the (text, state) tuple it replaces
    assert (text, state) == (result.text, result.state)


def test_gen_len_stops_at_a_blank_line_unless_a_stop_is_given(pipe):
    seed_style = pipe.stream("User: hi\n\nAssistant:", gen_len=300, seed=5)
    for _ in seed_style:
        pass
    assert seed_style.finish_reason == "stop" and len(seed_style.tokens) < 40
    own_stop = pipe.stream("User: hi\n\nAssistant:", gen_len=40, seed=5, stop=["@@@@"])
    for _ in own_stop:
        pass
    assert own_stop.finish_reason == "length" and len(own_stop.tokens) == 40
    plain = pipe.stream("User: hi\n\nAssistant:", max_tokens=40, seed=5)  # our own name: no implied stop
    for _ in plain:
        pass
    assert plain.finish_reason == "length" and "\n\n" in plain.text


def test_aliases_given_twice_are_refused(pipe):
    state = pipe.prefill("hi")
    with pytest.raises(TypeError, match="state= or its alias states="):
        pipe.generate("x", state=state, states=state, max_tokens=1)
    with pytest.raises(TypeError, match="state= or its alias states="):
        pipe.prefill("x", state, states=state)
    with pytest.raises(TypeError, match="max_tokens= or its alias gen_len="):
        pipe.generate("x", gen_len=3, max_tokens=3)
    assert Pipline is Pipeline
