"""The open-snapshot dialog: saved conversations with their date and first message; Delete twice
removes the highlighted one."""
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
    """Lists `snapshots` (SnapshotInfo, newest first); Enter returns the chosen path, Esc None.
    Delete asks once ("Del again deletes NAME") and deletes the highlighted file on the second press."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="snapshots_cancel"),
                Binding("delete", "delete_snapshot", "Delete", id="snapshots_delete")]
    HINT = "Enter open · Del delete · Esc cancel"

    def __init__(self, snapshots: Sequence, folder: Path | None = None, save_key: str = "Ctrl+S") -> None:
        super().__init__()
        self.snapshots = list(snapshots)
        self.folder = folder
        self.save_key = save_key
        self.armed: Path | None = None  # the file a second Delete removes

    def compose(self):
        with Vertical(id="snapshot-box") as box:
            box.border_title = "Open a saved conversation"
            box.border_subtitle = self.HINT
            yield OptionList(
                *(Option(snapshot_prompt(info), id=str(index)) for index, info in enumerate(self.snapshots)),
                id="snapshot-list",
            )
            where = f" in {self.folder}" if self.folder else ""
            yield Static(f"No saved conversations{where} yet. Save one with {self.save_key}.", id="snapshot-empty")

    def on_mount(self) -> None:
        self._show_list_or_empty()
        self.query_one("#snapshot-list").focus()

    def _show_list_or_empty(self) -> None:
        has_options = self.query_one("#snapshot-list", OptionList).option_count > 0
        self.query_one("#snapshot-list").display = has_options
        self.query_one("#snapshot-empty").display = not has_options

    @on(OptionList.OptionSelected, "#snapshot-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(self.snapshots[int(event.option.id)].path))

    @on(OptionList.OptionHighlighted, "#snapshot-list")
    def _moved(self) -> None:
        self._disarm()

    def _disarm(self) -> None:
        self.armed = None
        self.query_one("#snapshot-box").border_subtitle = self.HINT

    def action_delete_snapshot(self) -> None:
        options = self.query_one("#snapshot-list", OptionList)
        if options.highlighted is None:
            return
        path = Path(self.snapshots[int(options.get_option_at_index(options.highlighted).id)].path)
        if self.armed != path:
            self.armed = path
            self.query_one("#snapshot-box").border_subtitle = f"Del again deletes {path.name} · Esc cancel"
            return
        try:
            path.unlink()
        except OSError as error:
            self.notify(f"{path}: {error.strerror or error}", title="Could not delete", severity="error")
            return
        options.remove_option_at_index(options.highlighted)
        self._disarm()
        self._show_list_or_empty()
        self.notify(f"Deleted {path.name}")

    def action_cancel(self) -> None:
        self.dismiss(None)
