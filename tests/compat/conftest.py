"""Compat fixtures: tiny checkpoints, and one that soon writes a blank line ("\\n\\n", id 261)
so that generations which stop there (the seed's `gen_len=`) end after a few dozen tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

BLANK_LINE_ID = 261
SHAPE = dict(n_layer=2, n_embd=64)  # one head of 64: the cheapest shape


@pytest.fixture(scope="session")
def talkative_v7(tmp_path_factory) -> Path:
    """v7, random weights, with the head's row for "\\n\\n" scaled up 4x: a blank line comes
    within a few dozen sampled tokens instead of thousands."""
    checkpoint = make_checkpoint("7", SHAPE["n_layer"], SHAPE["n_embd"])
    checkpoint["head.weight"][BLANK_LINE_ID] *= 4.0
    return save_checkpoint(tmp_path_factory.mktemp("compat") / "talkative-v7.pth", checkpoint)
