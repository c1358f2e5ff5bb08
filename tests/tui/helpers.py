"""Helpers for the TUI tests: run an app under Pilot without an async test plugin, wait for
replies, and spy on the sampling settings each token is drawn with."""
from __future__ import annotations

import asyncio
import threading
import time

from rwkv_chat.pipeline import Pipeline
from rwkv_chat.sampling import SamplingSettings


def run_app(app, scenario, size: tuple[int, int] = (100, 30)) -> None:
    """Run `await scenario(pilot)` against `app` in a headless terminal of `size`."""

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await scenario(pilot)

    asyncio.run(main())


class SettingsSpy:
    """Wraps `pipeline.stream` so every read of the sampling settings (one before the reply
    starts, then one before every token) is recorded. `hold_at(n)` makes the n-th read wait
    until `release()`: the reply is then paused mid-way, with `held` set."""

    def __init__(self, pipeline: Pipeline):
        self.seen: list[SamplingSettings] = []
        self.held = threading.Event()
        self._release = threading.Event()
        self._hold_at: int | None = None
        original = pipeline.stream

        def stream(prompt, state=None, settings=None, **overrides):
            def read() -> SamplingSettings:
                if self._hold_at is not None and len(self.seen) + 1 == self._hold_at:
                    self.held.set()
                    self._release.wait(timeout=10)
                value = settings() if callable(settings) else settings
                self.seen.append(value)
                return value

            return original(prompt, state, read, **overrides)

        pipeline.stream = stream

    def hold_at(self, n: int) -> None:
        self._hold_at = n
        self.held.clear()
        self._release.clear()

    def release(self) -> None:
        self._hold_at = None
        self._release.set()


async def wait_until(pilot, condition, timeout: float = 10.0) -> None:
    """Let the app run until `condition()` holds (fails the test after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def wait_for_reply(pilot) -> None:
    """Until the running reply has ended and the screen has settled."""
    screen = pilot.app.screen_stack[0]
    await wait_until(pilot, lambda: not screen.replying and not screen.working and not screen.session.busy)
    await pilot.pause()


def chat(pilot):
    """The chat screen (the bottom of the screen stack)."""
    return pilot.app.screen_stack[0]


def shown(pilot) -> list[tuple[str, str]]:
    """(role, text) of every message on screen."""
    from rwkv_chat.tui.widgets.conversation import MessageView

    return [(view.role, view.text) for view in chat(pilot).query(MessageView)]


def notes(pilot) -> str:
    """The text of every notification shown so far."""
    return "\n".join(str(n.message) for n in pilot.app._notifications)


async def send(pilot, text: str, *, wait: bool = False) -> None:
    """Type `text` into the message box and press Enter (then, with `wait`, until the reply ended)."""
    from rwkv_chat.tui.widgets.prompt import PromptInput

    await pilot.click(PromptInput)
    chat(pilot).prompt.text = text
    await pilot.press("enter")
    if wait:
        await wait_for_reply(pilot)
