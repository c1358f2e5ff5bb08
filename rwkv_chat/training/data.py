"""Corpus preparation for the embedded demo model.

Corpus choice
-------------
Two conversational corpora that install from PyPI (dev-only: ``pip install
chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3 pyyaml``); neither is a runtime dependency.

* ``chitchat-dataset`` 0.9.0 -- the Chit-Chat Challenge dataset of the BYU Perception, Control
  and Cognition lab: 7,168 open-domain conversations (about 139k turns, 3M tokens) between
  people, short casual turns. Licence: MIT (the wheel ships the MIT ``LICENSE``, "Copyright (c)
  2019 Perception, Control and Cognition Lab"), which allows redistribution and derived works
  with attribution. This is the bulk of the data: it is large enough for a small model to learn
  the shape of a short conversational reply.
* ``chatterbot-corpus`` 1.3.3 -- the ChatterBot training corpus by Gunther Cox, English part
  only: about 800 distinct short conversations, mostly question/answer pairs (greetings, small
  talk, trivia, tech support).
  Licence: BSD (package classifier "License :: OSI Approved :: BSD License"; the upstream
  repository's licence is BSD-3-Clause). Added because its turns are clean, well-punctuated
  questions and answers, a good complement to chit-chat's lower-case texting style.
  ``coding.yml`` is left out: its answers are multi-line code blocks, which do not survive
  collapsing a turn onto one line.

Format
------
Each conversation becomes alternating ``User: {turn}\\n\\nAssistant: {turn}\\n\\n`` blocks (the
chat template of the app: a reply ends at ``\\n\\n``); a conversation with an odd number of
turns loses its last (unanswered) turn. Turns are cleaned by :func:`clean_turn`; an empty turn
or one over ``MAX_TURN_CHARS`` characters is dropped and splits its conversation in two (the
demo should answer briefly). Conversations are shuffled with a seeded RNG, split into train/val
*by conversation* (per corpus), ChatterBot's training part is repeated (``chatterbot_repeat``),
and each split is concatenated into one token stream.

Vocabulary
----------
A narrow model with the full 65,536-row world vocabulary would spend most of its compute and
file size on the output layer. The corpus uses a few tens of thousands of distinct tokens, most
of them rare typos and names. :func:`build_vocab` keeps the tokens seen at least ``min_count``
times (plus every single-byte token, so anything can still be spelled), and
:func:`restrict_tokens` re-spells every other token with the longest kept tokens that make up
its bytes. The text is unchanged (decoding gives the same bytes); only the segmentation of rare
words is finer. The model is trained over this local vocabulary and expanded to the world
vocabulary when exported (:func:`rwkv_chat.training.rwkv7.expand_to_world`).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat.template import exchange

__all__ = [
    "PreparedData",
    "build_documents",
    "build_vocab",
    "clean_turn",
    "format_conversation",
    "load_chatterbot",
    "load_chitchat",
    "prepare",
    "restrict_tokens",
]

MAX_TURN_CHARS = 400  # a longer (or empty) turn splits its conversation and is dropped
_WS = re.compile(r"\s+")
_LONE_I = re.compile(r"(?<![\w'])i(?=(?:'(?:m|ve|ll|d)\b)|(?![\w']))")


def clean_turn(text: str) -> str:
    """One line of text: whitespace runs (newlines included) become one space; trimmed.

    Light normalisation of chat style: a lone "i" (also in i'm, i've, i'll, i'd) becomes "I" and
    the first letter is capitalised. Nothing else is rewritten.
    """
    text = _WS.sub(" ", text.replace("\u00a0", " ")).strip()
    text = _LONE_I.sub("I", text)
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    return text


def format_conversation(turns: list[str]) -> str:
    """``User: a\\n\\nAssistant: b\\n\\n...``; drops a trailing unanswered turn."""
    return "".join(exchange(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2))


def _segments(turns: list[str]) -> list[list[str]]:
    """Clean turns; an empty or over-long turn splits the conversation (and is dropped).

    Segments shorter than two turns are dropped.
    """
    segments, current = [], []
    for turn in turns:
        turn = clean_turn(turn)
        if turn and len(turn) <= MAX_TURN_CHARS:
            current.append(turn)
            continue
        segments.append(current)
        current = []
    segments.append(current)
    return [seg for seg in segments if len(seg) >= 2]


def load_chitchat() -> list[list[str]]:
    """Conversations (lists of turns) from ``chitchat-dataset``; consecutive messages of one
    speaker form one turn (joined with a space), as the dataset itself groups them."""
    import chitchat_dataset

    path = Path(chitchat_dataset.__file__).parent / "dataset.json"
    with open(path, encoding="utf-8") as file:
        raw = json.load(file)
    conversations = []
    for key in sorted(raw):  # json order is stable, but sort to be explicit
        turns = [" ".join(msg["text"] for msg in group) for group in raw[key]["messages"]]
        conversations.extend(_segments(turns))
    return conversations


def load_chatterbot(skip: tuple[str, ...] = ("coding.yml",)) -> list[list[str]]:
    """English conversations from ``chatterbot-corpus`` (exact duplicates removed)."""
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    seen: set[tuple[str, ...]] = set()
    conversations = []
    for path in sorted(glob.glob(os.path.join(DATA_DIRECTORY, "english", "*.yml"))):
        if os.path.basename(path) in skip:
            continue
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
        for conv in data.get("conversations") or []:
            for turns in _segments([str(t) for t in conv]):
                key = tuple(turns)
                if key not in seen:
                    seen.add(key)
                    conversations.append(turns)
    return conversations


def build_documents(
    seed: int, val_fraction: float = 0.02, chatterbot_repeat: int = 3
) -> tuple[list[str], list[str]]:
    """Formatted conversations of both corpora, shuffled (seeded), split train/val.

    The split is made first, per corpus, so no conversation is in both. ChatterBot's training
    conversations are then repeated ``chatterbot_repeat`` times: they are few (about 2% of the
    tokens) but are exactly the short, direct question/answer style the demo should have.
    """
    rng = random.Random(seed)
    train: list[str] = []
    val: list[str] = []
    for conversations, repeat in ((load_chitchat(), 1), (load_chatterbot(), chatterbot_repeat)):
        docs = [format_conversation(c) for c in conversations]
        rng.shuffle(docs)
        n_val = max(1, int(len(docs) * val_fraction))
        val.extend(docs[:n_val])
        train.extend(docs[n_val:] * repeat)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def build_vocab(token_lists: list[list[int]], tokenizer, min_count: int) -> list[int]:
    """World ids kept in the local vocabulary: frequent tokens plus all single-byte tokens."""
    counts = collections.Counter()
    for ids in token_lists:
        counts.update(ids)
    keep = {tid for tid, n in counts.items() if n >= min_count}
    for tid in range(1, tokenizer.vocab_size):
        if len(tokenizer.token_bytes(tid)) == 1:
            keep.add(tid)
    return sorted(keep)


def restrict_tokens(ids: list[int], keep: set[int], tokenizer, _cache: dict | None = None) -> list[int]:
    """Re-spell every token outside ``keep`` with the longest kept tokens covering its bytes."""
    cache = {} if _cache is None else _cache
    if "by_bytes" not in cache:
        cache["by_bytes"] = {tokenizer.token_bytes(t): t for t in keep}
        cache["longest"] = max(len(b) for b in cache["by_bytes"])
    by_bytes, longest = cache["by_bytes"], cache["longest"]
    out: list[int] = []
    for tid in ids:
        if tid in keep:
            out.append(tid)
            continue
        pieces = cache.get(tid)
        if pieces is None:
            data, pieces, start = tokenizer.token_bytes(tid), [], 0
            while start < len(data):
                for stop in range(min(len(data), start + longest), start, -1):
                    piece = by_bytes.get(data[start:stop])
                    if piece is not None:
                        pieces.append(piece)
                        start = stop
                        break
                else:  # cannot happen: every single byte is kept
                    raise ValueError(f"byte {data[start]:#x} has no kept token")
            cache[tid] = pieces
        out.extend(pieces)
    return out


@dataclass
class PreparedData:
    """Token streams over the local vocabulary, and the local -> world id map."""

    train: torch.Tensor  # int32 [n_train] local ids
    val: torch.Tensor  # int32 [n_val] local ids
    token_ids: torch.Tensor  # int64 [K] world id of each local id
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        torch.save(
            {"train": self.train, "val": self.val, "token_ids": self.token_ids, "meta": json.dumps(self.meta)},
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreparedData:
        d = torch.load(path, weights_only=True)
        return cls(d["train"], d["val"], d["token_ids"], json.loads(d["meta"]))


def prepare(
    seed: int = 0,
    min_count: int = 12,
    val_fraction: float = 0.02,
    chatterbot_repeat: int = 3,
    tokenizer=None,
) -> PreparedData:
    """The whole pipeline: load, clean, format, shuffle, split, tokenize, restrict vocabulary."""
    if tokenizer is None:
        from rwkv_chat.tokenizer import Tokenizer

        tokenizer = Tokenizer()
    train_docs, val_docs = build_documents(seed, val_fraction, chatterbot_repeat)
    train_ids = [tokenizer.encode(d) for d in train_docs]
    val_ids = [tokenizer.encode(d) for d in val_docs]
    vocab = build_vocab(train_ids, tokenizer, min_count)
    keep, cache = set(vocab), {}
    local = {tid: i for i, tid in enumerate(vocab)}

    def stream(lists: list[list[int]]) -> torch.Tensor:
        flat: list[int] = []
        for ids in lists:
            flat.extend(local[t] for t in restrict_tokens(ids, keep, tokenizer, cache))
        return torch.tensor(flat, dtype=torch.int32)

    n_world = sum(len(ids) for ids in train_ids)
    train, val = stream(train_ids), stream(val_ids)
    meta = {
        "seed": seed,
        "min_count": min_count,
        "val_fraction": val_fraction,
        "chatterbot_repeat": chatterbot_repeat,
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "train_tokens": int(train.numel()),
        "val_tokens": int(val.numel()),
        "train_tokens_world_segmentation": n_world,
        "vocab": len(vocab),
    }
    return PreparedData(train, val, torch.tensor(vocab, dtype=torch.long), meta)
