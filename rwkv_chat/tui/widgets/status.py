"""The status line: model, strategy, tokens in the state, speed of the last reply."""
from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


@dataclass(frozen=True)
class StatusInfo:
    model: str = ""
    version: str = ""
    strategy: str = ""
    tokens: int = 0
    tokens_per_second: float | None = None
    time_to_first_token: float | None = None
    state_file: str | None = None
    busy: bool = False  # a reply is being generated
    working: bool = False  # a session job runs (a new conversation's prefill, an open, a save)
    note: str | None = None
    """Shown in place of the speed figures, e.g. that this is the tiny demo model."""


def status_text(info: StatusInfo, compact: bool = False) -> Text:
    """One line (two with a note); `compact` uses short words for narrow terminals."""
    text = Text()
    text.append(info.model, style="bold")
    text.append(f" · RWKV v{info.version} · {info.strategy}")
    if info.state_file:
        text.append(f" · state {info.state_file}")
    text.append(f" · {info.tokens} tok" if compact else f" · {info.tokens} tokens in state")
    if info.busy:
        text.append(" · generating…", style="italic")
    elif info.working:
        text.append(" · working…", style="italic")
    elif info.tokens_per_second is not None:
        text.append(f" · {info.tokens_per_second:.1f} tok/s")
        if info.time_to_first_token is not None:
            text.append(f" · TTFT {info.time_to_first_token:.2f}s" if compact
                        else f" · first token {info.time_to_first_token:.2f} s")
    if info.note:
        text.append(f"\n{info.note}", style="bold")
    return text


class StatusLine(Static):
    """Draws `info` (set by the screen)."""

    COMPACT_BELOW = 96  # columns of text (the line has 1 column of padding each side)

    info: reactive[StatusInfo] = reactive(StatusInfo, layout=True)

    def watch_info(self, info: StatusInfo) -> None:
        self.set_class(bool(info.note), "-note")

    def render(self) -> Text:
        return status_text(self.info, compact=self.size.width < self.COMPACT_BELOW)
