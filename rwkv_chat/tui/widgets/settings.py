"""The settings pane: one Input per sampling value, validated through SamplingSettings."""
from __future__ import annotations

import re
from dataclasses import dataclass

from textual import on
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Input, Label, Static

from ...sampling import SamplingSettings

# field -> label shown in the pane
FIELDS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "presence": "presence",
    "frequency": "frequency",
    "penalty_decay": "penalty decay",
    "max_tokens": "max tokens",
    "seed": "seed",
}
INTEGER_FIELDS = {"top_k", "max_tokens", "seed"}


def format_value(name: str, value) -> str:
    if value is None:
        return ""  # seed: none means a fresh random seed per reply
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_value(name: str, text: str):
    """The typed value for `name` from the text in its box; ValueError when it is not a number."""
    text = text.strip()
    if name == "seed" and text in ("", "none", "random"):
        return None
    try:
        return int(text) if name in INTEGER_FIELDS else float(text)
    except ValueError:
        kind = "a whole number" if name in INTEGER_FIELDS else "a number"
        raise ValueError(f"{FIELDS[name]} must be {kind}, got {text!r}") from None


def shown_names(message: str) -> str:
    """`message` with field names (penalty_decay) replaced by the labels the pane shows."""
    for name, label in FIELDS.items():
        if name != label:
            message = re.sub(rf"\b{name}\b", label, message)
    return message


class SettingsPane(Vertical):
    """Shows `settings`; when the user submits a valid value posts `Changed(new_settings)`.
    An invalid value shows the reason under the boxes and puts the old value back."""

    settings: reactive[SamplingSettings] = reactive(SamplingSettings, init=False)

    @dataclass
    class Changed(Message):
        settings: SamplingSettings

    def __init__(self, settings: SamplingSettings, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Settings"
        self.set_reactive(SettingsPane.settings, settings)

    def compose(self):
        for name, label in FIELDS.items():
            with Horizontal(classes="setting"):
                yield Label(label, classes="setting-label")
                yield Input(format_value(name, getattr(self.settings, name)), id=f"setting-{name}",
                            classes="setting-input", compact=True, placeholder="random" if name == "seed" else "")
        yield Static("", id="settings-error")

    def watch_settings(self, settings: SamplingSettings) -> None:
        for name in FIELDS:
            box = self.query_one(f"#setting-{name}", Input)
            value = format_value(name, getattr(settings, name))
            if box.value != value:
                box.value = value

    def value_text(self, name: str) -> str:
        """The text shown for one setting (tests read the pane through this)."""
        return self.query_one(f"#setting-{name}", Input).value

    @on(Input.Submitted, ".setting-input")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._apply(event.input)

    @on(Input.Blurred, ".setting-input")
    def _blurred(self, event: Input.Blurred) -> None:
        self._apply(event.input)

    def _apply(self, box: Input) -> None:
        name = box.id.removeprefix("setting-")
        old = getattr(self.settings, name)
        error = self.query_one("#settings-error", Static)
        error.update("")  # an error is about the last value entered only
        error.remove_class("-visible")
        try:
            value = parse_value(name, box.value)
            if value == old:
                box.value = format_value(name, old)
                return
            new = self.settings.replace(**{name: value})
        except ValueError as problem:
            error.update(shown_names(str(problem)))
            error.add_class("-visible")
            box.value = format_value(name, old)
            return
        error.update("")
        error.remove_class("-visible")
        self.settings = new
        self.post_message(self.Changed(new))
