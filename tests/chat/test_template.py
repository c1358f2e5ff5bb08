"""The chat format, written once (rwkv_chat.chat.template) for the session, the CLI and the trainer."""
from __future__ import annotations

import pytest

from rwkv_chat.chat.template import clean_user_message, exchange, normalise_preamble, turn_prompt
from rwkv_chat.training.data import format_conversation


def test_the_format_spelled_out():
    assert turn_prompt("Hi") == "User: Hi\n\nAssistant:"
    assert turn_prompt("Hi", "Bob", "Ann", end_previous=True) == "\n\nBob: Hi\n\nAnn:"
    assert exchange("Hi", "Hello!") == "User: Hi\n\nAssistant: Hello!\n\n"
    assert normalise_preamble("  You are kind.\r\n") == "You are kind.\n\n" and normalise_preamble(" ") == ""


def test_a_message_never_holds_the_turn_separator():
    assert clean_user_message(" a\r\n\r\n\n b \n") == "a\n b"
    with pytest.raises(ValueError, match="empty"):
        clean_user_message("\n \n")


def test_training_data_uses_the_chat_format():
    assert format_conversation(["q1", "a1", "q2", "a2", "dangling"]) == (
        "User: q1\n\nAssistant: a1\n\nUser: q2\n\nAssistant: a2\n\n")
