"""The chat screen's remappable commands (ids, default keys, descriptions) and key/theme name checks.

The TUI builds its Textual bindings from KEY_BINDINGS; `rwkv_chat.config` validates the [keys]
and [chat] theme entries of config.toml with `is_key_name` and `theme_names`. Textual is imported
only inside those two checks, so reading the config does not start the UI.
"""
from __future__ import annotations

from dataclasses import dataclass

_MODIFIERS = ("ctrl", "shift", "alt", "meta", "super", "hyper")


@dataclass(frozen=True)
class KeyBinding:
    """One remappable command: its id (the name used under [keys]), default key(s), description."""

    id: str
    key: str
    description: str


# The commands of the chat screen, in the order the help screen lists them.
KEY_BINDINGS: tuple[KeyBinding, ...] = (
    KeyBinding("send", "enter", "Send the message"),
    KeyBinding("newline", "ctrl+j,shift+enter", "New line in the message"),
    KeyBinding("stop", "escape", "Stop reply / cancel edit / back to the message box"),
    KeyBinding("regenerate", "ctrl+r", "Regenerate the last reply"),
    KeyBinding("continue", "ctrl+g", "Continue the last reply"),
    KeyBinding("edit_last", "ctrl+l", "Edit the last message"),
    KeyBinding("new", "ctrl+n", "New conversation"),
    KeyBinding("save", "ctrl+s", "Export the conversation to a .rwkvchat file"),
    KeyBinding("open", "ctrl+o", "Conversations: open, rename, delete, search, export"),
    KeyBinding("temperature_down", "f5", "Temperature -0.1"),
    KeyBinding("temperature_up", "f6", "Temperature +0.1"),
    KeyBinding("top_p_down", "f7", "Top-p -0.05"),
    KeyBinding("top_p_up", "f8", "Top-p +0.05"),
    KeyBinding("toggle_panes", "f2", "Show or hide the side panes"),
    KeyBinding("state_files", "f3", "Go to the state-file pane"),
    KeyBinding("settings", "f4", "Go to the settings pane"),
    KeyBinding("persona", "ctrl+t", "Edit the system prompt (persona)"),
    KeyBinding("conversation", "alt+up", "Go to the conversation (select, scroll, copy)"),
    KeyBinding("previous_message", "up", "Conversation: previous message"),
    KeyBinding("next_message", "down", "Conversation: next message"),
    KeyBinding("first_message", "home", "Conversation: first message"),
    KeyBinding("last_message", "end", "Conversation: last message"),
    KeyBinding("page_up", "pageup", "Conversation: scroll a page up"),
    KeyBinding("page_down", "pagedown", "Conversation: scroll a page down"),
    KeyBinding("copy_message", "c", "Conversation: copy the selected message"),
    KeyBinding("copy_code", "b", "Conversation: copy its code block (again: next)"),
    KeyBinding("help", "f1", "Help: keys and commands"),
    KeyBinding("quit", "ctrl+q", "Quit"),
)
DEFAULT_KEYS: dict[str, str] = {binding.id: binding.key for binding in KEY_BINDINGS}
DESCRIPTIONS: dict[str, str] = {binding.id: binding.description for binding in KEY_BINDINGS}


def is_key_name(name: str) -> bool:
    """Whether Textual can bind `name` (lower case): modifiers joined by "+" to one key, given
    as a Textual key name ("f5", "escape", "pageup"), a character ("a", "?") or its Unicode
    name ("question_mark"). True for anything when Textual is not installed."""
    try:
        from textual.keys import KEY_ALIASES, KEY_NAME_REPLACEMENTS, Keys, key_to_character
    except ImportError:
        return True
    *modifiers, key = name.split("+")
    if not key or any(m not in _MODIFIERS for m in modifiers) or len(set(modifiers)) != len(modifiers):
        return False
    named = {k.value.split("+")[-1] for k in Keys if not k.value.startswith("<")}
    if key in named or key in KEY_ALIASES or key in KEY_NAME_REPLACEMENTS.values() or key == "newline":
        return True
    if len(key) == 1:
        return key.isprintable() and not key.isspace()
    try:
        return key_to_character(key) is not None
    except Exception:
        return False


def theme_names() -> set[str]:
    """Textual's built-in theme names (empty when Textual is not installed: nothing to check)."""
    try:
        from textual.theme import BUILTIN_THEMES
    except ImportError:
        return set()
    return set(BUILTIN_THEMES)
