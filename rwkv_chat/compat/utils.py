"""`rwkv.utils` of the `rwkv` 0.8.32 package: PIPELINE and PIPELINE_ARGS, same calls, same draws.

    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS(temperature=1.0, top_p=0.7, alpha_frequency=0.25, token_ban=[0])
    np.random.seed(0)
    text = pipeline.generate(ctx, token_count=200, args=args, callback=print_piece)

`sample_logits` follows 0.8.32's algorithm step for step (softmax; top-p cutoff at the first
descending probability whose float32 running sum reaches top_p; top-k; probs ** (1/T); a draw
with numpy's global generator for CPU logits, `torch.multinomial` for others), so the same
`np.random.seed` and the same logits give the same token. It only avoids sorting the whole
vocabulary when a few hundred of the largest probabilities settle the result, which they
almost always do. Its quirks are kept on purpose, for identical output: temperature 0 means
"top_p = 0" (a draw among the tied most likely tokens), and top_p = 1.0 can collapse to the most
likely token when the float32 sum stops short of 1.0. rwkv-chat's own `Pipeline` fixes both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import RWKVChatError
from ..tokenizer import Tokenizer

WORLD_VOCAB = "rwkv_vocab_v20230424"
_HEAD = 512  # largest probabilities examined before falling back to a full sort


class UnsupportedVocabError(RWKVChatError, ValueError):
    """PIPELINE was given a vocabulary this package cannot load."""


@dataclass
class PIPELINE_ARGS:  # noqa: N801 - the name scripts import
    """Generation settings of `PIPELINE.generate`, with 0.8.32's names and defaults."""

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    alpha_frequency: float = 0.2  # subtracted per (decayed) occurrence of a token
    alpha_presence: float = 0.2  # subtracted once a token has occurred
    alpha_decay: float = 0.996  # occurrences decay by this factor per generated token
    token_ban: list = field(default_factory=list)  # ids never generated
    token_stop: list = field(default_factory=list)  # ids that end the generation
    chunk_len: int = 256  # prompt tokens per forward call


class _TiktokenAdapter:
    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))


def _load_tokenizer(name: str):
    if name == WORLD_VOCAB or (isinstance(name, str) and name.endswith(WORLD_VOCAB + ".txt")):
        return Tokenizer() if name == WORLD_VOCAB else Tokenizer(name)
    if name == "cl100k_base":
        try:
            import tiktoken
        except ImportError:
            raise UnsupportedVocabError("PIPELINE(model, 'cl100k_base') needs tiktoken: pip install tiktoken") from None
        return _TiktokenAdapter(tiktoken.get_encoding(name))
    raise UnsupportedVocabError(
        f"PIPELINE vocabulary {name!r} is not supported: use {WORLD_VOCAB!r} (the RWKV world models' "
        "vocabulary), or 'cl100k_base' with tiktoken installed"
    )


class PIPELINE:  # noqa: N801 - the name scripts import
    """Tokenizer, sampler and a simple generation loop over a model with 0.8.32's `forward`."""

    def __init__(self, model, WORD_NAME: str):  # noqa: N803 - 0.8.32's argument name
        self.model = model
        self.tokenizer = _load_tokenizer(WORD_NAME)

    def refine_context(self, context: str) -> str:
        """Strip every line (spaces, U+3000, '\\r'), drop empty lines, and start with one '\\n'."""
        lines = (line.strip().strip("\u3000").strip("\r") for line in context.strip().split("\n"))
        return "\n" + "\n".join(line for line in lines if line).strip()

    def encode(self, x: str) -> list[int]:
        return self.tokenizer.encode(x)

    def decode(self, x) -> str:
        """The text of the ids, or a lone U+FFFD when they end inside a UTF-8 character (0.8.32)."""
        if isinstance(self.tokenizer, Tokenizer):
            try:
                return self.tokenizer.decode_bytes(x).decode("utf-8")
            except UnicodeDecodeError:
                return "\ufffd"
        return self.tokenizer.decode(x)

    # ------------------------------------------------------------------ sampling
    def sample_logits(self, logits, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0) -> int:
        if temperature == 0:
            temperature, top_p = 1.0, 0
        probs = torch.softmax(logits.float(), dim=-1)
        top_k = int(top_k)
        if probs.device.type in ("cpu", "privateuseone"):
            return _sample_numpy(probs.cpu().numpy(), temperature, top_p, top_k)
        return _sample_torch(probs, temperature, top_p, top_k)

    # ------------------------------------------------------------------ generation
    def generate(self, ctx: str, token_count: int = 100, args: PIPELINE_ARGS | None = None, callback=None,
                 state=None) -> str:
        """Feed `ctx`, then sample up to `token_count` tokens with `args`; return the text.
        `callback(piece)` gets each piece of complete UTF-8 text as it is made. The state list,
        when given, is advanced in place (as `model.forward` does)."""
        args = PIPELINE_ARGS() if args is None else args
        generated: list[int] = []
        shown = 0  # generated tokens already passed to the callback
        text = ""
        occurrence: dict[int, float] = {}
        for step in range(token_count):
            pending = self.encode(ctx) if step == 0 else [token]
            if not pending:
                raise ValueError("PIPELINE.generate() needs a ctx of at least one token, got an empty string")
            for start in range(0, len(pending), args.chunk_len):
                out, state = self.model.forward(pending[start : start + args.chunk_len], state)
            for banned in args.token_ban:
                out[banned] = -float("inf")
            for seen, count in occurrence.items():
                out[seen] -= args.alpha_presence + count * args.alpha_frequency
            token = self.sample_logits(out, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
            if token in args.token_stop:
                break
            generated.append(token)
            for seen in occurrence:
                occurrence[seen] *= args.alpha_decay
            # 0.8.32's rule, kept for identical draws: a substring test, so ' ', '1', '01' or ''
            # count 0 but '00' counts 1
            weight = 0 if self.decode([token]) in " \t0123456789" else 1
            occurrence[token] = occurrence.get(token, 0) + weight
            piece = self.decode(generated[shown:])
            if "\ufffd" not in piece:
                if callback:
                    callback(piece)
                text += piece
                shown = step + 1
        return text


def _cutoff_from(descending: np.ndarray, top_p: float) -> float | None:
    """The probability at which the float32 running sum of `descending` first reaches top_p,
    or None when it does not within these values."""
    reached = np.cumsum(descending) >= top_p
    index = int(np.argmax(reached))
    return float(descending[index]) if reached[index] else None


def _sample_numpy(probs: np.ndarray, temperature: float, top_p: float, top_k: int) -> int:
    """0.8.32's CPU sampler. A full argsort is needed only when the cutoff lies beyond the
    largest `_HEAD` probabilities or top-k must choose among tied probabilities; otherwise the
    head alone decides, with the same result."""
    size = len(probs)
    use_top_k = 0 < top_k < size
    head = min(_HEAD, size)
    head_values, head_ids = torch.topk(torch.from_numpy(probs), head)
    head_values, head_ids = head_values.numpy(), head_ids.numpy()
    cutoff = _cutoff_from(head_values, top_p)
    tie_at_k = use_top_k and (top_k >= head or head_values[top_k - 1] == head_values[top_k])
    if cutoff is None or tie_at_k:
        ascending_ids = np.argsort(probs)
        descending = probs[ascending_ids][::-1]
        cutoff = _cutoff_from(descending, top_p)
        if cutoff is None:  # never reached: 0.8.32 then keeps only the largest probability
            cutoff = float(descending[0])
        dropped_by_k = ascending_ids[:-top_k] if use_top_k else None
    else:
        dropped_by_k = None
        if use_top_k:
            keep = np.zeros(size, dtype=bool)
            keep[head_ids[:top_k]] = True
            dropped_by_k = ~keep
    probs[probs < cutoff] = 0
    if dropped_by_k is not None:
        probs[dropped_by_k] = 0
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    probs = probs / np.sum(probs)
    return int(np.random.choice(a=size, p=probs))


def _sample_torch(probs: torch.Tensor, temperature: float, top_p: float, top_k: int) -> int:
    """0.8.32's sampler for logits on a GPU: torch sorting and `torch.multinomial`."""
    ascending_ids = torch.argsort(probs)
    descending = torch.flip(probs[ascending_ids], dims=(0,))
    running = torch.cumsum(descending, dim=-1).cpu().numpy()
    cutoff = float(descending[int(np.argmax(running >= top_p))])
    probs[probs < cutoff] = 0
    if 0 < top_k < len(probs):
        probs[ascending_ids[:-top_k]] = 0
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return int(torch.multinomial(probs, num_samples=1)[0])
