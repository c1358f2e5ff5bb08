"""The message box: a TextArea where Enter sends and Ctrl+J (or Shift+Enter) starts a new line."""
from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from ...chat.config import DEFAULT_KEYS


class PromptInput(TextArea):
    """Posts `Submitted(text)` on Enter (the screen clears the box once it accepts it); the keys come from the keymap
    (binding ids "send" and "newline")."""

    BINDINGS = [
        # priority: TextArea would otherwise insert a newline for Enter itself
        Binding(DEFAULT_KEYS["send"], "submit", "Send", id="send", priority=True, show=False),
        Binding(DEFAULT_KEYS["newline"], "newline", "New line", id="newline", show=False),
    ]

    @dataclass
    class Submitted(Message):
        prompt: PromptInput
        text: str

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         highlight_cursor_line=False)

    def action_submit(self) -> None:
        text = self.text
        if text.strip():
            self.post_message(self.Submitted(self, text))

    def action_newline(self) -> None:
        self.insert("\n")
