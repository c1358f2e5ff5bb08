"""Where rwkv-chat keeps files: the one module that knows paths.

By default the platform's user folders (platformdirs, app name "rwkv-chat"):

    data dir      snapshots/   saved conversations (*.rwkvchat)
                  states/      the user's tuned state files (*.pth)
    config dir    config.toml

Setting RWKV_CHAT_HOME=/some/folder moves all of them under that folder
(/some/folder/snapshots, /some/folder/states, /some/folder/config); tests use it.

Tuned state files are also looked up in the bundled `states/` folders: `rwkv_chat/states/`
inside the package and, in a source checkout, `states/` at the repository root.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` for a temp file in the folder of `path`, flush it to disk, then
    move it over `path` with os.replace, so readers see the old file or the new one, never a
    half-written one. The temp file is removed when `write` fails (or is interrupted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        write(temp)
        _flush_to_disk(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
