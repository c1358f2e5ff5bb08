"""Sampling settings and the token sampler.

`Sampler.sample` follows the order of ChatRWKV's `PIPELINE.generate` / `sample_logits`:
token bans -> presence/frequency penalties -> softmax -> top-p cutoff -> top-k ->
probs ** (1 / temperature) -> renormalise -> draw. Differences from that reference, on purpose:

- top_p = 1.0 keeps the whole distribution (the reference's float32 cumulative sum may never
  reach 1.0 and then collapses to greedy);
- temperature 0 is the argmax of the penalised logits (the reference draws among tied maxima);
- temperature is applied as softmax(logits / T) over the kept tokens, which equals
  probs ** (1 / T) renormalised but cannot underflow to all zeros at small T;
- draws come from the sampler's own seeded `torch.Generator`, never from global RNG state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SamplingError

END_OF_TEXT = 0
"""Token id of end-of-text in the world vocabulary; banned by default in chat."""

_MAX_SEED = 2**64 - 1
_PENALTY_FREE_CHARS = frozenset(" \t0123456789")
_PENALTY_FREE_BYTES = frozenset(b" \t0123456789")


def _shown(value, limit: int = 80) -> str:
    """repr(value) for a message, cut to `limit` characters (a config value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class _Bounds:
    """Allowed range of one numeric setting, and how `nudge` rounds it."""

    low: float
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    integer: bool = False
    decimals: int = 0
    note: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            span = f">= {self.low:g}"
        elif self.low_open:
            span = f"greater than {self.low:g} and at most {self.high:g}"
        else:
            span = f"from {self.low:g} to {self.high:g}"
        return f"{kind} {span}{self.note}"

    def contains(self, value: float) -> bool:
        above_low = value > self.low if self.low_open else value >= self.low
        return above_low and (self.high is None or value <= self.high)

    def check(self, name: str, value: Any) -> float | int:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (self.integer and not isinstance(value, int)):
            raise SamplingError(f"{name} must be {self.describe()}, got {_shown(value)}")
        value = value if self.integer else float(value)
        if not self.contains(value):  # also refuses NaN
            raise SamplingError(f"{name} must be {self.describe()}, got {_shown(value)}")
        return value

    def lowest(self) -> float:
        """Smallest value `nudge` can reach: one rounding step above an open lower bound."""
        return round(self.low + 10.0**-self.decimals, self.decimals) if self.low_open else self.low


_BOUNDS: dict[str, _Bounds] = {
    "temperature": _Bounds(0.0, 5.0, decimals=2, note=" (0 means greedy)"),
    "top_p": _Bounds(0.0, 1.0, low_open=True, decimals=2),
    "top_k": _Bounds(0, integer=True, note=" (0 turns top-k off)"),
    "presence": _Bounds(-5.0, 5.0, decimals=2),
    "frequency": _Bounds(-5.0, 5.0, decimals=2),
    "penalty_decay": _Bounds(0.0, 1.0, low_open=True, decimals=4),
    "max_tokens": _Bounds(1, integer=True),
}


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise SamplingError(f"seed must be None or an integer from 0 to 2**64 - 1, got {_shown(seed)}")
    return seed


def _check_token_ban(token_ban: Any) -> tuple[int, ...]:
    message = f"token_ban must be a sequence of token ids (integers >= 0), got {_shown(token_ban)}"
    if not _is_sequence(token_ban):
        raise SamplingError(message)
    ids = tuple(token_ban)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise SamplingError(message)
    return ids


def _check_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        raise SamplingError(f"stop must be a sequence of strings, got the single string {stop!r}: wrap it in a list")
    if not _is_sequence(stop):
        raise SamplingError(f"stop must be a sequence of non-empty strings, got {_shown(stop)}")
    texts = tuple(stop)
    if not all(isinstance(text, str) and text for text in texts):
        raise SamplingError(f"stop must be a sequence of non-empty strings, got {_shown(stop)}")
    return texts


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """How to pick tokens. Immutable; every constructor path validates (ValueError names the field).

    Defaults are ChatRWKV's chat values (temperature 1.0, top_p 0.3, presence 0.5,
    frequency 0.5, penalty decay 0.996) with end-of-text banned.
    """

    temperature: float = 1.0
    top_p: float = 0.3
    top_k: int = 0
    presence: float = 0.5
    frequency: float = 0.5
    penalty_decay: float = 0.996
    max_tokens: int = 256
    seed: int | None = None
    token_ban: tuple[int, ...] = (END_OF_TEXT,)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, bounds in _BOUNDS.items():
            object.__setattr__(self, name, bounds.check(name, getattr(self, name)))
        object.__setattr__(self, "seed", _check_seed(self.seed))
        object.__setattr__(self, "token_ban", _check_token_ban(self.token_ban))
        object.__setattr__(self, "stop", _check_stop(self.stop))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _refuse_unknown(cls, names: Iterable[str]) -> None:
        unknown = sorted(set(names) - set(cls.field_names()), key=str)
        if unknown:
            listed = ", ".join(repr(name) for name in unknown)
            raise SamplingError(f"unknown sampling setting(s) {listed}; known: {', '.join(cls.field_names())}")

    def replace(self, **changes: Any) -> SamplingSettings:
        """A validated copy with `changes` applied."""
        self._refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingSettings:
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise SamplingError(f"sampling settings must be a mapping, got {type(data).__name__}")
        cls._refuse_unknown(data)
        return cls(**data)

    def nudge(self, field: str, delta: float) -> SamplingSettings:
        """A copy with `field` moved by `delta`, rounded to the field's step and clamped to its range."""
        bounds = _BOUNDS.get(field)
        if bounds is None:
            raise SamplingError(f"{field!r} cannot be nudged; numeric settings: {', '.join(_BOUNDS)}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
            raise SamplingError(f"nudge delta for {field} must be a finite number, got {_shown(delta)}")
        if bounds.integer and not isinstance(delta, int):
            raise SamplingError(f"nudge delta for {field} must be an integer, got {_shown(delta)}")
        old = getattr(self, field)
        new = old + delta if bounds.integer else round(old + delta, bounds.decimals)
        new = max(new, bounds.lowest())
        if bounds.high is not None:
            new = min(new, bounds.high)
        if (new - old) * delta < 0:  # a value already outside the nudge range stays put
            new = old
        return self.replace(**{field: new})


def penalty_weight(token: str | bytes) -> float:
    """How much one occurrence of this token adds to its repetition count: 0.0 or 1.0.

    0.0 when the token is made only of spaces, tabs and ASCII digits (the empty token
    included), else 1.0. For single characters this is exactly ChatRWKV's rule, which is the
    substring test `text in ' \\t0123456789'`. For multi-character tokens that test is an
    accident of `in` on strings: it exempts '01' and '89' but not '00', '  ', ' 1' or '2024'.
    We exempt every all-space/tab/digit token (300 world-vocabulary tokens instead of 22),
    which is what the rule is meant to do: numbers and indentation repeat legitimately.
    Pass the token's own text (or bytes); undecodable pieces ('\\ufffd') count 1.0 as there.
    """
    allowed = _PENALTY_FREE_BYTES if isinstance(token, (bytes, bytearray)) else _PENALTY_FREE_CHARS
    return 0.0 if all(unit in allowed for unit in token) else 1.0


_PROBE = 256  # top-p almost always ends within the few hundred most likely tokens
_BUCKETS = 4096  # logit buckets for the rare top-p cutoff deep in a flat distribution
_LOGIT_SPAN = 120.0  # below max - 104 a float32 probability is exactly 0


def _first_reaching(cumulative: torch.Tensor, target: float) -> int:
    """Index of the first entry of a non-decreasing tensor that is >= target (len if none)."""
    return int(torch.searchsorted(cumulative, target))


def _first_reaching_above(cumulative: torch.Tensor, target: torch.Tensor) -> int:
    """Index of the first entry strictly greater than target: zero-weight entries are never hit."""
    return int(torch.searchsorted(cumulative, target, right=True))


def _cutoff_by_buckets(scores: torch.Tensor, probs: torch.Tensor, top_p: float) -> float:
    """Top-p cutoff without sorting the vocabulary: bucket tokens by logit, find the bucket where
    the descending mass reaches top_p, then sort only that bucket. 0.0 if it is never reached."""
    top = float(scores.max())
    low = top - _LOGIT_SPAN
    scaled = (scores.clamp(min=low) - low) * (_BUCKETS / _LOGIT_SPAN)
    buckets = scaled.to(torch.int64).clamp_(max=_BUCKETS - 1)
    mass = torch.bincount(buckets, weights=probs.double(), minlength=_BUCKETS)
    mass_from_top = mass.flip(0).cumsum(0)
    rank = _first_reaching(mass_from_top, top_p)
    if rank == _BUCKETS:
        return 0.0
    mass_above = float(mass_from_top[rank - 1]) if rank else 0.0
    band = torch.sort(probs[buckets == _BUCKETS - 1 - rank], descending=True).values
    position = _first_reaching(mass_above + band.cumsum(0, dtype=torch.float64), top_p)
    return float(band[min(position, band.numel() - 1)])


def _kept_ids(scores: torch.Tensor, probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor | None:
    """Ids that survive the top-p cutoff and top-k, or None when every token does.

    Top-p keeps every token whose probability is at least that of the token at which the
    descending cumulative sum first reaches top_p (so ties at the cutoff stay), as ChatRWKV does.
    """
    vocab = probs.numel()
    limit = top_k if 0 < top_k < vocab else vocab
    if top_p >= 1.0:
        return None if limit == vocab else torch.topk(probs, limit).indices
    head_probs, head_ids = torch.topk(probs, min(limit, _PROBE))
    position = _first_reaching(head_probs.cumsum(0, dtype=torch.float64), top_p)
    head_is_all_allowed = head_ids.numel() == limit
    if position < head_ids.numel():
        cutoff = float(head_probs[position])
        if head_is_all_allowed or float(head_probs[-1]) < cutoff:  # no tie hides past the head
            return head_ids[head_probs >= cutoff]
    elif head_is_all_allowed:  # top-k stops before top-p would
        return head_ids
    else:
        cutoff = _cutoff_by_buckets(scores, probs, top_p)
    if limit < vocab:
        limited_probs, limited_ids = torch.topk(probs, limit)
        return limited_ids[limited_probs >= cutoff]
    return None if cutoff <= 0.0 else torch.nonzero(probs >= cutoff).squeeze(1)


def _float_logits(logits: torch.Tensor, copy: bool) -> torch.Tensor:
    if logits.dim() != 1:
        raise SamplingError(f"logits must be one-dimensional [vocab], got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise SamplingError("logits are empty: there is no token to sample")
    return logits.detach().to(device="cpu", dtype=torch.float32, copy=copy)


def _check_top(scores: torch.Tensor, top: float) -> None:
    """Raise for logits whose highest value `top` shows NaN, +inf, or nothing but -inf."""
    if math.isnan(top) or top == math.inf:
        bad = int((torch.isnan(scores) | torch.isposinf(scores)).sum())
        raise SamplingError(f"logits contain {bad} NaN or +infinite value(s) of {scores.numel()}; "
                            "the model or the state fed to it is broken")
    if top == -math.inf:
        raise SamplingError("every logit is -inf: all tokens are banned, there is none to sample")


class Sampler:
    """Repetition-penalty bookkeeping plus seeded draws. One per generation stream.

    Per token: `token = sampler.sample(logits, settings)`, then
    `sampler.record(token, penalty_weight(text), penalty_decay=settings.penalty_decay)`.
    A new reply gets a new Sampler (ChatRWKV clears its counts per reply).
    """

    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()
        self._counts: torch.Tensor | None = None  # decayed occurrence weights, float32 [vocab]
        self._seen: torch.Tensor | None = None  # 1.0 where a token was recorded (presence), float32 [vocab]
        seed = _check_seed(seed)
        if seed is None:
            self._generator.seed()  # fresh entropy
        else:
            self._generator.manual_seed(seed)

    @property
    def seed(self) -> int:
        """The generator's seed (a random one when constructed with seed=None)."""
        return self._generator.initial_seed()

    def _fit_vocab(self, size: int) -> None:
        if self._counts is None:
            self._counts = torch.zeros(size, dtype=torch.float32)
            self._seen = torch.zeros(size, dtype=torch.float32)
        elif self._counts.numel() < size:
            grow = size - self._counts.numel()
            self._counts = torch.cat([self._counts, self._counts.new_zeros(grow)])
            self._seen = torch.cat([self._seen, self._seen.new_zeros(grow)])

    def record(self, token_id: int, weight: float, *, penalty_decay: float) -> None:
        """Book a sampled token: decay every count by `penalty_decay`, then add `weight` to this
        token's count. The token is "present" from now on even with weight 0 (as in ChatRWKV)."""
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise SamplingError(f"token_id must be an integer >= 0, got {_shown(token_id)}")
        _BOUNDS["penalty_decay"].check("penalty_decay", penalty_decay)
        self._fit_vocab(token_id + 1)
        if penalty_decay != 1.0:
            self._counts.mul_(penalty_decay)
        self._counts.numpy()[token_id] += weight  # numpy's indexing: ~10x faster than a tensor's for one item
        self._seen.numpy()[token_id] = 1.0

    def penalised(self, logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
        """New float32 tensor: logits with bans at -inf and `presence + frequency * count` subtracted
        from every recorded token."""
        scores = _float_logits(logits, copy=True)
        if not math.isfinite(float(scores.sum())):  # one cheap pass; only then look closer (the sum may overflow)
            _check_top(scores, float(scores.max()))  # max: NaN when any is NaN; -inf bans alone leave it finite
        vocab = scores.numel()
        if settings.token_ban:
            if max(settings.token_ban) >= vocab:
                raise SamplingError(f"token_ban id {max(settings.token_ban)} is outside the vocabulary of {vocab} tokens")
            scores.index_fill_(0, torch.tensor(settings.token_ban), -math.inf)
        if self._counts is not None:
            if self._counts.numel() > vocab:
                raise SamplingError(f"recorded token ids reach {self._counts.numel() - 1}, outside the vocabulary of {vocab} tokens")
            self._fit_vocab(vocab)
            if settings.presence:
                scores.sub_(self._seen, alpha=settings.presence)
            if settings.frequency:
                scores.sub_(self._counts, alpha=settings.frequency)
        return scores

    def _greedy(self, logits: torch.Tensor, settings: SamplingSettings) -> int:
        """The first highest penalised logit. Without bans or penalties in effect: one pass over
        the logits as they are (numpy's argmax: ~10x torch's on a CPU), which also finds a NaN
        (argmax stops at the first) or an infinity."""
        adjusted = settings.token_ban or (self._counts is not None and (settings.presence or settings.frequency))
        scores = self.penalised(logits, settings) if adjusted else _float_logits(logits, copy=False)
        best = int(scores.numpy().argmax())
        top = float(scores[best])
        if not math.isfinite(top):
            if not adjusted:  # penalised() checked the logits themselves
                _check_top(scores, top)
            raise SamplingError("no token can be sampled: every token is banned")
        return best

    def _candidates(self, logits: torch.Tensor, settings: SamplingSettings) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(ids or None for all, their final probabilities) after penalties, top-p, top-k, temperature."""
        if settings.temperature == 0:
            return torch.tensor([self._greedy(logits, settings)]), torch.ones(1)
        scores = self.penalised(logits, settings)
        top_score = scores.max()
        if top_score == -math.inf:
            raise SamplingError("no token can be sampled: every token is banned")
        probs = torch.softmax(scores, dim=0)
        ids = _kept_ids(scores, probs, settings.top_p, settings.top_k)
        kept_scores = scores if ids is None else scores[ids]
        weights = torch.softmax((kept_scores - top_score) / settings.temperature, dim=0)
        return ids, weights

    def probabilities(self, logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
        """The distribution `sample` draws from, as a dense float32 tensor [vocab] (for tests and display)."""
        ids, weights = self._candidates(logits, settings)
        if ids is None:
            return weights
        return torch.zeros(logits.numel(), dtype=torch.float32).index_copy_(0, ids, weights)

    def sample(self, logits: torch.Tensor, settings: SamplingSettings) -> int:
        """Pick the next token id from last-position logits [vocab] (not modified)."""
        if settings.temperature == 0:
            return self._greedy(logits, settings)
        ids, weights = self._candidates(logits, settings)
        if weights.numel() == 1:
            choice = 0
        else:
            cumulative = weights.cumsum(0, dtype=torch.float64)
            target = torch.rand((), generator=self._generator, dtype=torch.float64) * cumulative[-1]
            choice = _first_reaching_above(cumulative, target)
            if choice >= weights.numel():  # rounding put target at the very top
                choice = int(torch.nonzero(weights).max())
        return choice if ids is None else int(ids[choice])
