"""Text in, text out: prefill a prompt, then sample, feed and decode one token at a time.

    pipe = Pipeline(model)
    state = pipe.prefill("User: hi\\n\\nAssistant:")
    gen = pipe.stream("", state, temperature=0, stop=["\\n\\n"])
    for piece in gen:
        print(piece, end="")
    gen.state, gen.stats, gen.finish_reason

    text, state = pipe.generate("User: hi\\n\\nAssistant:", max_tokens=200, stop=["\\n\\n"])
    reply = pipe.generate("User: and then?\\n\\nAssistant:", state=state)   # continues the chat

The new_rwkv_pip spellings work too: `states=` for `state=` (a `GenerationResult` may be passed
back as it is), `gen_len=` for `max_tokens=` (and then, as there, a blank line ends the reply
unless a stop is given), and the class name `Pipline`.

A `Generation` does its work while it is iterated (the prompt is prefilled on the first `next`),
so a UI can create it in one thread and run it in another. Every sampled token is fed into the
model before the next one is drawn, so `gen.state` always holds exactly the tokens whose text
is in `gen.text`, plus the tokens of a stop string when one ended the generation.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .engine.state import RWKVState
from .sampling import Sampler, SamplingSettings, penalty_weight
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_CHUNK_LEN = 256

SettingsSource = SamplingSettings | Callable[[], SamplingSettings] | None

BLANK_LINE = "\n\n"
"""Where a `gen_len=` (new_rwkv_pip style) generation stops when no stop string is given."""


class GenerationResult(NamedTuple):
    """What `Pipeline.generate` returns: unpack it (`text, state = ...`) or pass it back whole as
    the next call's `state=` / `states=` to continue from where it ended."""

    text: str
    state: RWKVState


def _state_argument(state, states):
    """The state given as `state=` or its alias `states=` (not both); a GenerationResult stands
    for its state."""
    if states is not None:
        if state is not None:
            raise TypeError("pass the state once: state= or its alias states=, not both")
        state = states
    return state.state if isinstance(state, GenerationResult) else state


def _gen_len_overrides(gen_len, settings: SettingsSource, overrides: dict) -> dict:
    """new_rwkv_pip's `gen_len=N`: max_tokens=N, and a blank line ends the generation unless a
    stop is given (in `overrides` or in fixed `settings`)."""
    if gen_len is None:
        return overrides
    if "max_tokens" in overrides:
        raise TypeError("pass the length once: max_tokens= or its alias gen_len=, not both")
    overrides = dict(overrides, max_tokens=gen_len)
    stop_given = "stop" in overrides or (isinstance(settings, SamplingSettings) and settings.stop) or callable(settings)
    if not stop_given:
        overrides["stop"] = (BLANK_LINE,)
    return overrides


@dataclass(frozen=True)
class GenerationStats:
    """Counts and timings of one generation. `time_to_first_token` runs from the start of the
    iteration (prefill included) until the first token has been sampled and fed;
    `tokens_per_second` is the decode rate (generated tokens over the time after prefill)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationStats:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class StopStringFilter:
    """Holds back text that may be the start of a stop string, and finds stop strings that
    arrive split across several pieces."""

    def __init__(self) -> None:
        self._held = ""

    def push(self, piece: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        """Add decoded text; return (text now safe to show, whether a stop string was found).
        After a stop, the returned text is everything before the stop string."""
        text = self._held + piece
        found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = _longest_stop_prefix_suffix(text, stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def release(self) -> str:
        """The held-back text, when it can no longer become a stop string."""
        text, self._held = self._held, ""
        return text


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class Pipeline:
    """Generation over an `RWKV` model and the world tokenizer."""

    def __init__(self, model, tokenizer: Tokenizer | None = None):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def prefill(self, text: str, state: RWKVState | None = None, chunk_len: int = DEFAULT_CHUNK_LEN, *,
                states: RWKVState | None = None) -> RWKVState:
        """A new state after feeding `text` (in chunks of `chunk_len` tokens) to `state` (default:
        the model's initial state; `states=` is an alias). `state.logits` are the logits after the
        last token. Empty text returns the starting state itself (states are never mutated, so
        sharing is safe)."""
        return self.prefill_tokens(self.encode(text), _state_argument(state, states), chunk_len)

    def prefill_tokens(self, tokens: list[int], state: RWKVState | None = None,
                       chunk_len: int = DEFAULT_CHUNK_LEN) -> RWKVState:
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be at least 1, got {chunk_len}")
        state = _state_argument(state, None)
        if state is None:
            state = self.model.initial_state()
        for start in range(0, len(tokens), chunk_len):
            _, state = self.model.forward(tokens[start : start + chunk_len], state)
        return state

    def stream(self, prompt: str, state: RWKVState | None = None, settings: SettingsSource = None, *,
               states: RWKVState | None = None, gen_len: int | None = None, **overrides) -> Generation:
        """A `Generation` that prefills `prompt` and generates when iterated. `overrides` are
        `SamplingSettings` fields; `states=` and `gen_len=` are the aliases described above."""
        overrides = _gen_len_overrides(gen_len, settings, overrides)
        return Generation(self, prompt, _state_argument(state, states), settings_reader(settings, overrides))

    def generate(self, prompt: str, state: RWKVState | None = None, settings: SettingsSource = None, *,
                 states: RWKVState | None = None, gen_len: int | None = None, **overrides) -> GenerationResult:
        """Run a whole generation; return (text, state after it) as a `GenerationResult`."""
        generation = self.stream(prompt, state, settings, states=states, gen_len=gen_len, **overrides)
        for _ in generation:
            pass
        return GenerationResult(generation.text, generation.state)


Pipline = Pipeline
"""new_rwkv_pip's spelling of the class name."""


def settings_reader(settings: SettingsSource, overrides: dict) -> Callable[[], SamplingSettings]:
    """A zero-argument function giving the current settings with `overrides` applied."""
    if overrides:
        SamplingSettings().replace(**overrides)  # unknown or invalid names fail now, not mid-stream
    if settings is None:
        settings = SamplingSettings()
    if callable(settings):
        source = settings
        return (lambda: source().replace(**overrides)) if overrides else source
    if not isinstance(settings, SamplingSettings):
        raise TypeError(
            f"settings must be SamplingSettings or a callable returning them, not {type(settings).__name__}"
        )
    fixed = settings.replace(**overrides) if overrides else settings
    return lambda: fixed


class Generation:
    """One running generation: iterate it for text pieces (valid UTF-8, stop strings never shown).

    `cancel()` is thread-safe and ends the loop after the current token; `close()` (or closing
    the iterator) does the same from the iterating thread. `text`, `state`, `stats` and
    `finish_reason` can be read at any time; `finish_reason` is None until the generation ends
    (and stays None when it ended with an exception, which is kept in `error`).
    """

    def __init__(self, pipeline: Pipeline, prompt: str, state: RWKVState | None,
                 read_settings: Callable[[], SamplingSettings]):
        self.pipeline = pipeline
        self.prompt = prompt
        self.state: RWKVState | None = state
        self.text = ""
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._read_settings = read_settings
        self._cancelled = threading.Event()
        self._prompt_tokens = 0
        self._started_at: float | None = None
        self._prefilled_at: float | None = None
        self._first_token_at: float | None = None
        self._finished_at: float | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def close(self) -> None:
        """End the generation now, keeping what was generated (finish_reason "cancelled")."""
        self._cancelled.set()
        self._pieces.close()
        if self.finish_reason is None:
            self._finish("cancelled")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def stats(self) -> GenerationStats:
        if self._started_at is None:
            return GenerationStats()
        end = self._finished_at if self._finished_at is not None else time.perf_counter()
        prefilled = self._prefilled_at if self._prefilled_at is not None else end
        decode_seconds = end - prefilled
        generated = len(self.tokens)
        return GenerationStats(
            prompt_tokens=self._prompt_tokens,
            generated_tokens=generated,
            time_to_first_token=None if self._first_token_at is None else self._first_token_at - self._started_at,
            seconds=end - self._started_at,
            tokens_per_second=generated / decode_seconds if generated and decode_seconds > 0 else 0.0,
        )

    # ------------------------------------------------------------------ the loop
    def _run(self) -> Iterator[str]:
        self._started_at = time.perf_counter()
        try:
            self._prefill_prompt()
            yield from self._decode_loop()
        except GeneratorExit:
            self._finish("cancelled")
            raise
        except BaseException as error:
            self.error = error
            self._finished_at = time.perf_counter()
            raise

    def _prefill_prompt(self) -> None:
        prompt_tokens = self.pipeline.encode(self.prompt)
        self._prompt_tokens = len(prompt_tokens)
        if not prompt_tokens and (self.state is None or self.state.logits is None):
            raise ValueError("an empty prompt needs a state that already has logits (a prefilled state)")
        self.state = self.pipeline.prefill_tokens(prompt_tokens, self.state)
        self._prefilled_at = time.perf_counter()

    def _decode_loop(self) -> Iterator[str]:
        sampler = Sampler(self._read_settings().seed)
        decoder = StreamDecoder(self.pipeline.tokenizer)
        stop_filter = StopStringFilter()
        tokenizer = self.pipeline.tokenizer
        decoding = getattr(self.pipeline.model, "decoding", contextlib.nullcontext)
        while True:
            with decoding():
                settings = self._read_settings()
                reason = self._reason_to_end_before_sampling(settings)
                token = None if reason else sampler.sample(self.state.logits, settings)
                if token == tokenizer.eos_id:
                    reason = "eos"
                if not reason:
                    self._feed(token)
                    sampler.record(token, penalty_weight(tokenizer.decode([token])), penalty_decay=settings.penalty_decay)
            if reason:
                self._finish(reason)
                yield from self._show(stop_filter.release() + decoder.flush())
                return
            visible, stopped = stop_filter.push(decoder.feed(token), settings.stop)
            if stopped:
                self._finish("stop")
                yield from self._show(visible)
                return
            yield from self._show(visible)

    def _reason_to_end_before_sampling(self, settings: SamplingSettings) -> str | None:
        if self._cancelled.is_set():
            return "cancelled"
        if len(self.tokens) >= settings.max_tokens:
            return "length"
        return None

    def _feed(self, token: int) -> None:
        _, self.state = self.pipeline.model.forward([token], self.state)
        self.tokens.append(token)
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()

    def _show(self, piece: str) -> Iterator[str]:
        if piece:
            self.text += piece
            yield piece

    def _finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._finished_at = time.perf_counter()
