"""The conversation pane: one MessageView per message, plain text while streaming, Markdown after."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from rich.markdown import Markdown
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from ..keys import DEFAULT_KEYS


class MessageLike(Protocol):
    role: str
    text: str
    stats: object | None
    finish_reason: str | None


# how a reply ended (the pipeline's finish_reason) as its border shows it
FINISH_LABELS = {
    "cancelled": "stopped",
    "length": "max tokens",
    "eos": "end of text",
    "stop": "end of reply",  # the turn separator or one of the settings' stop strings
}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n(.*?)(?:^ {0,3}\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks in `text` (an unclosed last fence runs to the end)."""
    return [match.group(2).rstrip("\n") for match in _FENCE.finditer(text)]


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


def subtitle(message: MessageLike) -> str:
    """The border subtitle of a finished message: its stats and how it ended (replies only)."""
    if message.role != "assistant":
        return ""
    parts = [FINISH_LABELS.get(getattr(message, "finish_reason", None) or "", ""),
             stats_line(getattr(message, "stats", None))]
    return " · ".join(part for part in parts if part)


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

    @property
    def selected(self) -> bool:
        return self.has_class("-selected")

    def _draw(self) -> None:
        self.set_class(self.streaming, "-streaming")
        text = printable(self.text)
        if self.streaming:
            self.update(Text(text + " ▍"))
        elif self.role == "assistant":
            self.update(Markdown(text or "…"))
        else:
            self.update(Text(text))


def _binding(binding_id: str, action: str, label: str) -> Binding:
    return Binding(DEFAULT_KEYS[binding_id], action, label, id=binding_id, show=False)


class Conversation(VerticalScroll, can_focus=True):
    """The messages of a ChatSession, drawn from the list it is given (`show`); the screen
    streams the running reply into `reply_view`. Focused, it moves a selection between the
    messages (Up/Down/Home/End), scrolls by pages, and copies the selected message or its
    code blocks to the clipboard."""

    DEFAULT_PLACEHOLDER = "Type a message below and press Enter."
    BINDINGS = [
        _binding("previous_message", "select(-1)", "Previous"),
        _binding("next_message", "select(1)", "Next"),
        _binding("first_message", "select_first", "First"),
        _binding("last_message", "select_last", "Last"),
        _binding("page_up", "page_up", "Page up"),
        _binding("page_down", "page_down", "Page down"),
        Binding(DEFAULT_KEYS["copy_message"], "copy_message", "Copy", id="copy_message"),
        Binding(DEFAULT_KEYS["copy_code"], "copy_code", "Copy code", id="copy_code"),
    ]

    def __init__(self, *, user_label: str = "You", assistant_label: str = "Assistant",
                 placeholder: str = DEFAULT_PLACEHOLDER, id: str | None = None) -> None:
        super().__init__(id=id)
        self.labels = {"user": user_label, "assistant": assistant_label}
        self.placeholder = placeholder
        self.selected: int | None = None  # index of the selected message
        self._code_turn = 0  # which code block of the selected message "copy code" takes next

    def compose(self):
        yield Static(self.placeholder, id="placeholder")

    def on_mount(self) -> None:
        self.anchor()  # follow new text until the user scrolls up

    @property
    def views(self) -> list[MessageView]:
        return [view for view in self.query(MessageView) if not view.has_class("-removed")]

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
            view.add_class("-removed")
            view.remove()
        new = []
        for index, message in enumerate(messages[keep:], start=keep):
            live = streaming and index == len(messages) - 1
            view = MessageView(message.role, message.text, label=self.labels[message.role], streaming=live)
            if not live:
                view.border_subtitle = subtitle(message)
            new.append(view)
        for index, view in enumerate(views[:keep]):  # a kept reply may have new stats
            view.border_subtitle = subtitle(messages[index])
        if new:
            self.mount_all(new)
        self.query_one("#placeholder").display = not messages
        if self.selected is not None and self.selected >= len(messages):
            self.selected = len(messages) - 1 if messages else None
        self._mark_selected(scroll=False)
        if self.selected is None or self.screen.focused is not self:
            self.anchor()

    def append_to_reply(self, text: str) -> None:
        view = self.reply_view
        if view is not None:
            view.append(text)

    # ------------------------------------------------------------------ keyboard
    def on_focus(self) -> None:
        if self.selected is None and self.views:
            self.select_index(len(self.views) - 1)
        else:
            self._mark_selected()

    def on_blur(self) -> None:
        self._mark_selected(scroll=False)

    @property
    def selected_view(self) -> MessageView | None:
        views = self.views
        if self.selected is None or not 0 <= self.selected < len(views):
            return None
        return views[self.selected]

    def select_index(self, index: int) -> None:
        views = self.views
        if not views:
            return
        index = max(0, min(index, len(views) - 1))
        if index != self.selected:
            self._code_turn = 0
        self.selected = index
        self._mark_selected()

    def _mark_selected(self, scroll: bool = True) -> None:
        views = self.views
        # screen.focused, not has_focus: Focus/Blur reach this class's handlers before Widget's
        focused = self.is_mounted and self.screen.focused is self
        for index, view in enumerate(views):
            view.set_class(focused and index == self.selected, "-selected")
        view = self.selected_view
        if scroll and view is not None:
            self.release_anchor()
            self.scroll_to_widget(view, animate=False, top=view.outer_size.height > self.scrollable_content_region.height)

    def action_select(self, step: int) -> None:
        self.select_index((self.selected if self.selected is not None else len(self.views)) + step)

    def action_select_first(self) -> None:
        self.select_index(0)
        self.scroll_home(animate=False)

    def action_select_last(self) -> None:
        self.select_index(len(self.views) - 1)
        self.scroll_end(animate=False)

    def action_page_up(self) -> None:
        self.release_anchor()
        self.scroll_page_up(animate=False)

    def action_page_down(self) -> None:
        self.scroll_page_down(animate=False)

    def action_copy_message(self) -> None:
        view = self.selected_view
        if view is None:
            self.notify("There is no message to copy yet.")
            return
        self.app.copy_to_clipboard(view.text)
        self.notify(f"Copied the message ({len(view.text)} characters)", timeout=2)

    def action_copy_code(self) -> None:
        view = self.selected_view
        blocks = code_blocks(view.text) if view is not None else []
        if not blocks:
            self.notify("The selected message has no code block.")
            return
        turn = self._code_turn % len(blocks)
        self._code_turn = turn + 1
        self.app.copy_to_clipboard(blocks[turn])
        which = f" {turn + 1} of {len(blocks)}" if len(blocks) > 1 else ""
        self.notify(f"Copied code block{which}", timeout=2)
