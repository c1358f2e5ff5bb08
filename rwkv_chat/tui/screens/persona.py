"""The system-prompt dialog: edit the text fed before every conversation (the persona)."""
from __future__ import annotations

from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static, TextArea


class PersonaDialog(ModalScreen[str | None]):
    """Dismisses with the edited text (Ctrl+S or Apply) or None (Esc or Cancel)."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="persona_cancel"),
        Binding("ctrl+s", "apply", "Apply", id="persona_apply", priority=True),
    ]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self):
        with Vertical(id="persona-box") as box:
            box.border_title = "System prompt (persona)"
            box.border_subtitle = "Ctrl+S apply · Esc cancel"
            yield Static("Text fed to the model before the first message of every conversation: "
                         "who the assistant is, how it answers, or an example exchange. Empty: none.",
                         id="persona-help")
            yield TextArea(self.text, id="persona-text", soft_wrap=True, tab_behavior="focus")
            with Horizontal(id="persona-buttons"):
                yield Button("Apply", id="persona-apply", variant="primary")
                yield Button("Cancel", id="persona-cancel")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "persona-apply":
            self.action_apply()
        else:
            self.action_cancel()

    def action_apply(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)
