"""The state after a served token prefix, kept so a request that extends it prefills only the rest.

Keys are (start, token ids): `start` names the starting state (the model's initial state or a
tuned state file), so two conversations share an entry only when both began from the same state.
Least recently used entries go first once the total size passes `max_bytes`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..engine.state import RWKVState


def state_bytes(state: RWKVState) -> int:
    tensors = [t for layer in state.layers for t in layer]
    if state.logits is not None:
        tensors.append(state.logits)
    return sum(t.numel() * t.element_size() for t in tensors)


class StateCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], tuple[RWKVState, int]] = OrderedDict()
        self._lengths: dict[str, dict[int, int]] = {}  # start -> {prefix length: entries of that length}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self._bytes = 0

    def put(self, start: str, tokens: list[int], state: RWKVState) -> None:
        """Keep `state` (it must have logits: the state after the last of `tokens`); the caller
        must not change it afterwards (states are never modified in place by the engine)."""
        if not tokens or state.logits is None:
            return
        size = state_bytes(state)
        if size > self.max_bytes:
            return
        key = (start, tuple(tokens))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = (state, size)
            self._bytes += size
            lengths = self._lengths.setdefault(start, {})
            lengths[len(tokens)] = lengths.get(len(tokens), 0) + 1
            while self._bytes > self.max_bytes:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        (start, tokens), (_state, size) = self._entries.popitem(last=False)
        self._bytes -= size
        lengths = self._lengths[start]
        lengths[len(tokens)] -= 1
        if not lengths[len(tokens)]:
            del lengths[len(tokens)]

    def longest_prefix(self, start: str, tokens: list[int]) -> tuple[int, RWKVState | None]:
        """(n, state) for the longest cached prefix tokens[:n] of `tokens` (n may equal
        len(tokens)); (0, None) when none is cached."""
        with self._lock:
            for n in sorted(self._lengths.get(start, {}), reverse=True):
                if n > len(tokens):
                    continue
                key = (start, tuple(tokens[:n]))
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return n, entry[0]
            self.misses += 1
            return 0, None
