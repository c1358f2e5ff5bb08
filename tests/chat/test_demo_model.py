"""The bundled demo model through the chat core: a model that learned words lets these tests
check what random weights cannot (replies that end at a blank line, readable turns)."""
import re

import pytest
import torch

from rwkv_chat import Pipeline, RWKV
from rwkv_chat.chat import ChatSession
from rwkv_chat.demo import demo_model_path

QUESTIONS = ["Hi!", "How are you doing today?", "What do you like to do for fun?", "Do you like music?",
             "Where do you live?"]


@pytest.fixture(scope="module")
def demo_pipe(tmp_path_factory):
    return Pipeline(RWKV(demo_model_path(tmp_path_factory.mktemp("demo-cache"))))


def chat(pipe, question, seed):
    session = ChatSession(pipe)
    session.settings = session.settings.replace(seed=seed, max_tokens=80)
    reply = session.send(question)
    text = "".join(reply)
    return session, reply, text


def test_replies_end_at_the_blank_line_by_themselves(demo_pipe):
    results = [chat(demo_pipe, q, seed)[1].finish_reason for seed, q in enumerate(QUESTIONS)]
    assert results.count("stop") >= 4, results  # the model learned to close its turn with "\n\n"


def test_replies_are_readable_words(demo_pipe):
    for seed, question in enumerate(QUESTIONS):
        _, reply, text = chat(demo_pipe, question, seed)
        words = re.findall(r"[A-Za-z']+", text)
        assert len(words) >= 1, text
        assert sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", "")), text
        assert "\n\n" not in text and not text.startswith(" ")


def test_two_turns_then_snapshot_resume_exactly(demo_pipe, tmp_path):
    session, _, first = chat(demo_pipe, QUESTIONS[1], seed=3)
    "".join(session.send("That sounds fun. Tell me more."))
    path = session.save(tmp_path / "demo.rwkvchat")
    resumed = ChatSession.open(demo_pipe, path)
    assert [(m.role, m.text) for m in resumed.messages] == [(m.role, m.text) for m in session.messages]
    assert resumed.messages[1].text == first
    probe = demo_pipe.encode("User: Bye!\n\nAssistant:")
    expected, _ = demo_pipe.model.forward(probe, session.state)
    actual, _ = demo_pipe.model.forward(probe, resumed.state)
    assert torch.equal(actual, expected)
