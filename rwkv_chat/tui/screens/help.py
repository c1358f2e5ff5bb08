"""The help screen: every key (as currently mapped) and where the config file lives."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..keys import KEY_BINDINGS


_KEY_NAMES = {"pageup": "PageUp", "pagedown": "PageDown", "escape": "Esc"}


def key_label(keys: str) -> str:
    """'ctrl+j,shift+enter' -> 'Ctrl+J / Shift+Enter'."""
    def one(key: str) -> str:
        return "+".join(part.upper() if len(part) == 1 else _KEY_NAMES.get(part, part.capitalize())
                        for part in key.split("+"))

    return " / ".join(one(key) for key in keys.split(","))


def keys_table(keys: Mapping[str, str]) -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_column(style="dim", no_wrap=True)
    for binding in KEY_BINDINGS:
        table.add_row(key_label(keys.get(binding.id, binding.key)), binding.description, binding.id)
    table.add_row(key_label("ctrl+p"), "Command palette (commands, themes; the theme picked is kept)", "")
    table.add_row(key_label("tab,shift+tab"), "Next / previous box (settings, state files, conversation)", "")
    table.add_row(key_label("ctrl+s"), "In the system-prompt dialog: apply (Esc cancels)", "")
    return table


class HelpScreen(ModalScreen[None]):
    """Shows the key table; any of Esc, F1 or q closes it."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close", id="help_close")]

    def __init__(self, keys: Mapping[str, str], config_path: Path | None) -> None:
        super().__init__()
        self.keys = dict(keys)
        self.config_path = config_path

    def compose(self):
        with VerticalScroll(id="help-box") as box:
            box.border_title = "Keys"
            box.border_subtitle = "Esc to close"
            yield Static(keys_table(self.keys), id="help-keys")
            note = Text.assemble(
                "Remap a key by its name (right column) under [keys] in ",
                (str(self.config_path or "config.toml"), "bold"), ", e.g. ", ("temperature_up = \"ctrl+up\"", "italic"), ". Settings take effect from the "
                "next token, even in the middle of a reply.",
            )
            yield Static(note, id="help-note")

    def action_close(self) -> None:
        self.dismiss(None)
