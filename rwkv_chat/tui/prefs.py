"""Small preferences the app remembers between runs (the theme picked in the palette).

Kept apart from config.toml, which is the user's own file and never written by the app:
`prefs.json` in the user config dir, written atomically. An unreadable file is ignored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_atomically

PREFS_FILE_NAME = "prefs.json"


def prefs_path() -> Path:
    from ..chat import locations

    return Path(locations.config_dir()) / PREFS_FILE_NAME


def load_prefs(path: Path | None = None) -> dict[str, Any]:
    """The stored preferences, or {} when the file is missing or not a JSON object."""
    try:
        data = json.loads((path or prefs_path()).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_prefs(updates: dict[str, Any], path: Path | None = None) -> Path:
    """Merge `updates` into the stored preferences; raises OSError when it cannot write."""
    path = path or prefs_path()
    data = {**load_prefs(path), **updates}
    return write_atomically(path, lambda temp: temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
