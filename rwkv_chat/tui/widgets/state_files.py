"""The state-file pane: tuned state files with their size; ones that do not fit the model are dimmed."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ...chat.state_files import StateFileInfo
from ...engine.state import ModelShape


@dataclass(frozen=True)
class StateChoice:
    """One row of the pane: the file and whether it fits the loaded model (and why not)."""

    info: StateFileInfo
    fits: bool
    reason: str

    @classmethod
    def of(cls, info: StateFileInfo, shape: ModelShape) -> StateChoice:
        fits, reason = info.fits(shape)
        return cls(info, fits, reason)


def choice_prompt(choice: StateChoice, active: bool) -> Text:
    info = choice.info
    text = Text()
    text.append("● " if active else "  ", style="bold")
    text.append(info.name, style="bold" if choice.fits else "dim")
    if info.problem is None:
        text.append(f"  {info.n_layer}x{info.n_embd}", style="" if choice.fits else "dim")
    if not choice.fits:
        reason = choice.reason.removeprefix(f"{info.name} ")  # the name is on the line above
        text.append(f"\n  {reason}", style="dim italic")
    return text


class StateFilesPane(Vertical):
    """Lists `choices`; Enter on a fitting file posts `Chosen(path)`, on another one `Refused`."""

    @dataclass
    class Chosen(Message):
        path: Path

    @dataclass
    class Refused(Message):
        reason: str

    def __init__(self, choices: Sequence[StateChoice], *, active: Path | None = None,
                 folders: Sequence[Path] = (), id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "State files"
        self.choices = list(choices)
        self.active = active
        self.folders = list(folders)

    def compose(self):
        yield OptionList(id="state-list")
        yield Static("", id="state-empty")

    def on_mount(self) -> None:
        self._draw()

    def show(self, choices: Sequence[StateChoice], active: Path | None) -> None:
        self.choices, self.active = list(choices), active
        self._draw()

    def set_active(self, active: Path | None) -> None:
        self.active = active
        self._draw()

    def _draw(self) -> None:
        options = self.query_one("#state-list", OptionList)
        highlighted = options.highlighted
        options.clear_options()
        options.add_options(
            Option(choice_prompt(choice, choice.info.path == self.active), id=str(index))
            for index, choice in enumerate(self.choices)
        )
        if self.choices:
            options.highlighted = min(highlighted or 0, len(self.choices) - 1)
        options.display = bool(self.choices)
        empty = self.query_one("#state-empty", Static)
        empty.display = not self.choices
        where = ", ".join(str(folder) for folder in self.folders) or "the states folders"
        empty.update(f"No tuned state files. Put .pth state files in {where}.")

    @on(OptionList.OptionSelected, "#state-list")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        choice = self.choices[int(event.option.id)]
        if choice.fits:
            self.post_message(self.Chosen(choice.info.path))
        else:
            self.post_message(self.Refused(choice.reason))
