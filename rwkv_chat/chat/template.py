"""The chat format (ChatRWKV's), in one place: the session, `rwkv-chat generate --chat`, the
demo model's training data and scripts/make_demo_state.py all write it with these functions.

    {preamble}\\n\\nUser: {message}\\n\\nAssistant: {reply}\\n\\nUser: {message}\\n\\nAssistant: ...

A message never holds the turn separator "\\n\\n" (`clean_user_message` removes blank lines), so
a reply generated with the stop string TURN_END ends exactly at the end of its turn.
"""
from __future__ import annotations

import re

TURN_END = "\n\n"
USER = "User"
ASSISTANT = "Assistant"


def clean_user_message(text: str) -> str:
    """The message as the model will see it: newlines normalised, stripped, blank lines removed
    (so it cannot contain the turn separator "\\n\\n"). ValueError when nothing is left."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    text = re.sub(r"\n\s*\n", "\n", text)
    if not text:
        raise ValueError("the message is empty")
    return text


def normalise_preamble(preamble: str) -> str:
    """A non-empty preamble, stripped and followed by the turn separator; "" stays ""."""
    preamble = preamble.replace("\r\n", "\n").strip()
    return preamble + TURN_END if preamble else ""


def turn_prompt(message: str, user: str = USER, assistant: str = ASSISTANT, *, end_previous: bool = False) -> str:
    """What is fed before a reply: "User: {message}\\n\\nAssistant:" (the reply then usually
    starts with a space). end_previous=True puts the turn separator first, for a previous reply
    that ended without it (stopped, cut at max_tokens)."""
    return (TURN_END if end_previous else "") + f"{user}: {message}{TURN_END}{assistant}:"


def exchange(message: str, reply: str, user: str = USER, assistant: str = ASSISTANT) -> str:
    """One finished turn as the model sees it: "User: {message}\\n\\nAssistant: {reply}\\n\\n"."""
    return f"{turn_prompt(message, user, assistant)} {reply}{TURN_END}"
