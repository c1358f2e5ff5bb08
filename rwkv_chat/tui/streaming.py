"""Getting reply text from the generation thread to the screen without redrawing per token."""
from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_INTERVAL = 0.1  # seconds: at most ~10 redraws a second


class PieceBatcher:
    """Collects text pieces in the generation thread and hands them on in batches.

    `add` forwards everything collected once `interval` seconds have passed since the last
    batch; `flush` forwards the rest. A slow model (a token per `interval` or slower) shows
    every token at once; a fast one shows a batch every `interval`.
    """

    def __init__(self, send: Callable[[str], object], interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self._send = send
        self._interval = interval
        self._clock = clock
        self._pending: list[str] = []
        self._last_sent = clock()

    def add(self, piece: str) -> None:
        self._pending.append(piece)
        if self._clock() - self._last_sent >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._send(text)
        self._last_sent = self._clock()
