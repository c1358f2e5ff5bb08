"""The user's config file (TOML): default model, strategy, sampling values, theme and key bindings.

App config, read by the CLI and handed to the TUI; the chat layer does not see it. Read from
`config.toml` in the user config dir (see `rwkv_chat.chat.locations`) or from an
explicit `--config FILE`. Every section is optional; unknown sections and names are refused so a
typo does not pass silently. Example:

    [model]
    path = "~/models/RWKV-x070-World-1.5B-v3.pth"
    strategy = "cuda fp16"

    [chat]
    user = "User"
    assistant = "Assistant"
    theme = "textual-dark"

    [sampling]              # any SamplingSettings field
    temperature = 1.0
    top_p = 0.3

    [keys]                  # binding id = "key" or "key1,key2" (Textual key names)
    temperature_down = "f5"
    stop = "escape"

The binding ids, their default keys and the theme names come from `rwkv_chat.tui.keys` (which
imports Textual only to check a name); the TUI turns `Config.keys` into Textual bindings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import RWKVChatError
from .files import regular_file_problem
from .sampling import SamplingSettings
from .tui.keys import DEFAULT_KEYS, is_key_name, theme_names

CONFIG_FILE_NAME = "config.toml"


class ConfigError(RWKVChatError, ValueError):
    """The config file is unreadable, not TOML, or holds an unknown or invalid entry."""


MAX_PREAMBLE = 16_000
"""The longest [chat] preamble accepted, in characters."""
MAX_NAME = 200
"""The longest user / assistant name accepted, in characters."""

_SECTIONS = {
    "model": {"path", "strategy"},
    "chat": {"user", "assistant", "preamble", "theme"},
    "sampling": set(SamplingSettings.field_names()),
    "keys": set(DEFAULT_KEYS),
}


@dataclass(frozen=True)
class Config:
    """Settings read from the config file, with defaults for everything it leaves out."""

    model: Path | None = None
    """Model used when the command line names none (before falling back to the demo model)."""
    strategy: str | None = None
    """Strategy used when the command line names none (else cpu fp32, or cuda fp16 with CUDA)."""
    user: str = "User"
    assistant: str = "Assistant"
    preamble: str = ""
    """Text fed before the first turn of every conversation."""
    theme: str = "textual-dark"
    """A Textual theme name (textual-dark, textual-light, nord, gruvbox, ...)."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """[sampling] overrides (validated), applied on top of the chat session's own defaults."""
    keys: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KEYS))
    """Binding id -> comma-separated Textual key names, defaults merged with the file's [keys]."""
    source: Path | None = None
    """The file this was read from, or None when no file was found."""


def default_config_path() -> Path:
    """`config.toml` in the user config dir (RWKV_CHAT_HOME/config when that is set)."""
    from .chat import locations

    return Path(locations.config_dir()) / CONFIG_FILE_NAME


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read `path`, or the default config file when None. A missing default file gives the
    defaults; a missing explicit file, bad TOML or an invalid entry raises ConfigError."""
    explicit = path is not None
    file = Path(os.path.expanduser(str(path))) if explicit else default_config_path()
    problem = regular_file_problem(file, "config file")  # never opens: a FIFO cannot block
    if problem is not None:
        if explicit or os.path.lexists(file):
            raise ConfigError(problem)
        return Config()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file}: cannot read the config file ({error})") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: not valid TOML ({error})") from error
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{file}: not a usable config file (its arrays or tables are nested too deeply)") from None
    return parse_config(data, source=file)


def parse_config(data: dict[str, Any], source: Path | None = None) -> Config:
    """A Config from already-parsed TOML data (see the module docstring for the layout)."""
    where = f"{source}: " if source else ""

    def fail(message: str) -> ConfigError:
        return ConfigError(where + message)

    for section, values in data.items():
        if section not in _SECTIONS:
            raise fail(f"unknown section [{section}]; known: {', '.join(f'[{s}]' for s in _SECTIONS)}")
        if not isinstance(values, dict):
            raise fail(f"[{section}] must be a table")
        unknown = sorted(set(values) - _SECTIONS[section])
        if unknown:
            raise fail(f"unknown name(s) in [{section}]: {', '.join(unknown)}; known: {', '.join(sorted(_SECTIONS[section]))}")

    model, chat = data.get("model", {}), data.get("chat", {})
    for section, table in (("model", model), ("chat", chat)):
        for name, value in table.items():
            if not isinstance(value, str):
                raise fail(f"[{section}] {name} must be a string, got {value!r}")
            if "\0" in value:
                raise fail(f"[{section}] {name} contains a NUL character")
    sampling = dict(data.get("sampling", {}))
    for name in ("user", "assistant"):
        if name in chat and (not chat[name].strip() or "\n" in chat[name] or len(chat[name]) > MAX_NAME):
            raise fail(f"[chat] {name} must be a non-empty single line of at most {MAX_NAME} characters, "
                       f"got {_short(chat[name])}")
    if len(chat.get("preamble", "")) > MAX_PREAMBLE:
        raise fail(f"[chat] preamble is {len(chat['preamble'])} characters; the limit is {MAX_PREAMBLE}")
    if "theme" in chat:
        themes = theme_names()
        if themes and chat["theme"] not in themes:
            raise fail(f"[chat] theme {_short(chat['theme'])} is not a theme; known: {', '.join(sorted(themes))}")
    try:
        SamplingSettings.from_dict(sampling)
    except (TypeError, ValueError) as error:
        raise fail(f"[sampling] {error}") from error

    keys = dict(DEFAULT_KEYS)
    for binding_id, value in data.get("keys", {}).items():
        if not isinstance(value, str) or not all(part.strip() for part in value.split(",")):
            raise fail(f"[keys] {binding_id} must be a key name like \"f5\" or \"ctrl+r,f9\", got {_short(value)}")
        names = [part.strip().lower() for part in value.split(",")]
        for name in names:
            if not is_key_name(name):
                raise fail(f"[keys] {binding_id}: {_short(name)} is not a key name (examples: \"f5\", \"ctrl+r\", "
                           "\"escape\", \"shift+enter\", \"question_mark\")")
        keys[binding_id] = ",".join(names)
    _check_no_clash(keys, fail)

    return Config(
        model=Path(os.path.expanduser(model["path"])) if model.get("path") else None,
        strategy=model.get("strategy") or None,
        user=chat.get("user", "User"),
        assistant=chat.get("assistant", "Assistant"),
        preamble=chat.get("preamble", ""),
        theme=chat.get("theme", "textual-dark"),
        sampling=sampling,
        keys=keys,
        source=source,
    )


def _check_no_clash(keys: dict[str, str], fail) -> None:
    owner: dict[str, str] = {}
    for binding_id, value in keys.items():
        for key in value.split(","):
            if key in owner:
                raise fail(f"[keys] {key!r} is bound to both {owner[key]} and {binding_id}")
            owner[key] = binding_id


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
