"""The conversation pane: one MessageView per message, plain text while streaming, Markdown after."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rich.markdown import Markdown
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static


class MessageLike(Protocol):
    role: str
    text: str
    stats: object | None


# C0 controls (but tab and newline) and DEL as their visible "control pictures": a model can emit
# any byte, and a raw ESC or BEL must never reach the terminal.
_CONTROL_PICTURES = {code: 0x2400 + code for code in range(32) if chr(code) not in "\t\n"} | {0x7F: 0x2421}


def printable(text: str) -> str:
    return text.translate(_CONTROL_PICTURES)


def stats_line(stats) -> str:
    """'42 tokens, 12.3 tok/s, first token 0.15 s' for a reply's GenerationStats."""
    if stats is None or not getattr(stats, "generated_tokens", 0):
        return ""
    line = f"{stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s"
    if stats.time_to_first_token is not None:
        line += f", first token {stats.time_to_first_token:.2f} s"
    return line


class MessageView(Static):
    """One message. While a reply streams its text is plain (cheap to redraw); `finish` renders
    it as Markdown."""

    def __init__(self, role: str, text: str = "", *, label: str, streaming: bool = False) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.streaming = streaming
        self.border_title = label
        self._draw()

    def append(self, piece: str) -> None:
        self.text += piece
        self._draw()

    def finish(self, text: str | None = None, stats=None) -> None:
        if text is not None:
            self.text = text
        self.streaming = False
        self.border_subtitle = stats_line(stats)
        self._draw()

    def _draw(self) -> None:
        self.set_class(self.streaming, "-streaming")
        text = printable(self.text)
        if self.streaming:
            self.update(Text(text + " ▍"))
        elif self.role == "assistant":
            self.update(Markdown(text or "…"))
        else:
            self.update(Text(text))


class Conversation(VerticalScroll, can_focus=False):
    """The messages of a ChatSession, drawn from the list it is given (`show`); the screen
    streams the running reply into `reply_view`."""

    DEFAULT_PLACEHOLDER = "Type a message below and press Enter."

    def __init__(self, *, user_label: str = "You", assistant_label: str = "Assistant",
                 placeholder: str = DEFAULT_PLACEHOLDER, id: str | None = None) -> None:
        super().__init__(id=id)
        self.labels = {"user": user_label, "assistant": assistant_label}
        self.placeholder = placeholder

    def compose(self):
        yield Static(self.placeholder, id="placeholder")

    def on_mount(self) -> None:
        self.anchor()  # follow new text until the user scrolls up

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    @property
    def reply_view(self) -> MessageView | None:
        """The streaming reply, if one is running."""
        views = self.views
        return views[-1] if views and views[-1].streaming else None

    def show(self, messages: Sequence[MessageLike], *, streaming: bool = False) -> None:
        """Make the pane show `messages`; views whose message is unchanged are kept. With
        `streaming`, the last message is the reply being generated (plain text, no stats)."""
        views = self.views
        keep = 0
        for view, message in zip(views, messages):
            if view.role != message.role or view.text != message.text or view.streaming:
                break
            keep += 1
        for view in views[keep:]:
            view.remove()
        new = []
        for index, message in enumerate(messages[keep:], start=keep):
            live = streaming and index == len(messages) - 1
            view = MessageView(message.role, message.text, label=self.labels[message.role], streaming=live)
            if not live:
                view.border_subtitle = stats_line(getattr(message, "stats", None))
            new.append(view)
        for index, view in enumerate(views[:keep]):  # a kept reply may have new stats
            view.border_subtitle = stats_line(getattr(messages[index], "stats", None)) if view.role == "assistant" else ""
        if new:
            self.mount_all(new)
        self.query_one("#placeholder").display = not messages
        self.anchor()

    def append_to_reply(self, text: str) -> None:
        view = self.reply_view
        if view is not None:
            view.append(text)
