"""Where rwkv-chat keeps files: the one module that knows paths.

By default the platform's user folders (platformdirs, app name "rwkv-chat"):

    data dir      conversations/  every conversation, kept as it happens (index.sqlite3 + states)
                  snapshots/   conversations exported with Ctrl+S (*.rwkvchat)
                  exports/     conversations exported as Markdown
                  states/      the user's tuned state files (*.pth)
    config dir    config.toml

Setting RWKV_CHAT_HOME=/some/folder moves all of them under that folder
(/some/folder/snapshots, /some/folder/states, /some/folder/config); tests use it.

Tuned state files are also looked up in the bundled `states/` folders: `rwkv_chat/states/`
inside the package and, in a source checkout, `states/` at the repository root.
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "rwkv-chat"
HOME_ENV_VAR = "RWKV_CHAT_HOME"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_REPO_ROOT = _PACKAGE_DIR.parent


def home_override() -> Path | None:
    """The folder named by RWKV_CHAT_HOME, or None when it is unset or empty."""
    value = os.environ.get(HOME_ENV_VAR, "").strip()
    return Path(os.path.expanduser(value)) if value else None


def data_dir() -> Path:
    home = home_override()
    return home if home is not None else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    home = home_override()
    return home / "config" if home is not None else Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def snapshots_dir() -> Path:
    """Saved conversations (created on first save, not here)."""
    return data_dir() / "snapshots"


def conversations_dir() -> Path:
    """The conversation history: index.sqlite3 and one state file per conversation."""
    return data_dir() / "conversations"


def exports_dir() -> Path:
    """Conversations exported as Markdown from the history screen."""
    return data_dir() / "exports"


def user_states_dir() -> Path:
    """The user's own tuned state files."""
    return data_dir() / "states"


def bundled_states_dirs() -> list[Path]:
    """The `states/` folders shipped with rwkv-chat that exist: the package's own and, in a
    source checkout (a pyproject.toml next to the package), the repository's."""
    candidates = [_PACKAGE_DIR / "states"]
    if (_REPO_ROOT / "pyproject.toml").is_file():
        candidates.append(_REPO_ROOT / "states")
    return [folder for folder in candidates if folder.is_dir()]


def state_dirs() -> list[Path]:
    """Every folder searched for tuned state files: bundled ones first, then the user's."""
    return [*bundled_states_dirs(), user_states_dir()]
