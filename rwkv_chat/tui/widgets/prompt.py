"""The message box: a TextArea where Enter sends and Ctrl+J (or Shift+Enter) starts a new line."""
from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from ..keys import DEFAULT_KEYS


class PromptInput(TextArea):
    """Posts `Submitted(text)` on Enter; the screen calls `take(text)` once it accepts it, so a
    refused message stays in the box. The keys come from the keymap (binding ids "send" and
    "newline"). A paste only inserts text, newlines included: it never sends."""

    BINDINGS = [
        # priority: TextArea would otherwise insert a newline for Enter itself, and a binding
        # without priority runs only once the key has come back up to the app, after keys typed
        # later (the newline would land out of place). Both actions queue their work behind the
        # keys already waiting for this widget.
        Binding(DEFAULT_KEYS["send"], "submit", "Send", id="send", priority=True, show=False),
        Binding(DEFAULT_KEYS["newline"], "newline", "New line", id="newline", priority=True, show=False),
    ]

    @dataclass
    class Submitted(Message):
        prompt: PromptInput
        text: str

    class _SendQueued(Message, bubble=False):
        """Enter was pressed: read the box once the keys queued before it are in."""

    class _NewlineQueued(Message, bubble=False):
        """Ctrl+J was pressed: insert the newline after the keys queued before it."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         highlight_cursor_line=False)

    def action_submit(self) -> None:
        # A priority binding runs on the app's queue as soon as the app reads Enter, while the
        # keys typed just before it may still wait in this widget's queue (a fast typist, a
        # paste of "text\r", a loaded machine). Reading the box now would send part of the text;
        # a message to ourselves is handled after those keys.
        self.post_message(self._SendQueued())

    @on(_SendQueued)
    def _send_queued(self, event: _SendQueued) -> None:
        event.stop()
        text = self.text
        if text.strip():
            self.post_message(self.Submitted(self, text))

    def take(self, text: str) -> None:
        """Remove `text`, just sent, from the box, keeping whatever was typed after it."""
        current = self.text
        if current.startswith(text):
            rest = current[len(text):]
            self.text = rest
            self.move_cursor(self.document.end)
        else:
            self.clear()

    def action_newline(self) -> None:
        self.post_message(self._NewlineQueued())

    @on(_NewlineQueued)
    def _newline_queued(self, event: _NewlineQueued) -> None:
        event.stop()
        self.insert("\n")
