"""The open-snapshot dialog: saved conversations with their date and first message."""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option


def saved_at_label(saved_at) -> str:
    if isinstance(saved_at, datetime):
        return saved_at.strftime("%Y-%m-%d %H:%M")
    if isinstance(saved_at, (int, float)):
        return datetime.fromtimestamp(saved_at).strftime("%Y-%m-%d %H:%M")
    return str(saved_at or "")[:16].replace("T", " ")


def snapshot_prompt(info) -> Text:
    first = " ".join((info.first_message or "(empty conversation)").split())
    if len(first) > 60:
        first = first[:59] + "…"
    text = Text()
    text.append(saved_at_label(info.saved_at), style="bold")
    text.append(f"  {first}\n")
    text.append(f"  {info.n_messages} messages · {info.model_name} · {Path(info.path).name}", style="dim")
    return text


class SnapshotDialog(ModalScreen[Path | None]):
    """Lists `snapshots` (SnapshotInfo, newest first); Enter returns the chosen path, Esc None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="snapshots_cancel")]

    def __init__(self, snapshots: Sequence, folder: Path | None = None, save_key: str = "Ctrl+S") -> None:
        super().__init__()
        self.snapshots = list(snapshots)
        self.folder = folder
        self.save_key = save_key

    def compose(self):
        with Vertical(id="snapshot-box") as box:
            box.border_title = "Open a saved conversation"
            box.border_subtitle = "Enter open · Esc cancel"
            yield OptionList(
                *(Option(snapshot_prompt(info), id=str(index)) for index, info in enumerate(self.snapshots)),
                id="snapshot-list",
            )
            if not self.snapshots:
                where = f" in {self.folder}" if self.folder else ""
                yield Static(f"No saved conversations{where} yet. Save one with {self.save_key}.",
                             id="snapshot-empty")

    def on_mount(self) -> None:
        self.query_one("#snapshot-list").display = bool(self.snapshots)
        self.query_one("#snapshot-list").focus()

    @on(OptionList.OptionSelected, "#snapshot-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(self.snapshots[int(event.option.id)].path))

    def action_cancel(self) -> None:
        self.dismiss(None)
