"""Messages sent but not yet answered and stored. Each app process keeps its message in
`unanswered/{pid}.txt` from Enter until the reply is stored, so a kill during a reply loses
only the reply: the next start of the app finds the files of processes that are gone and puts
their text back in the message box."""
from __future__ import annotations

import os
from pathlib import Path

from ..files import process_alive, write_atomically
from . import locations


def folder() -> Path:
    return locations.data_dir() / "unanswered"


def _own_file() -> Path:
    return folder() / f"{os.getpid()}.txt"


def keep(text: str) -> None:
    """Keep `text` until `clear()`; a failure to write is ignored (the store reports disk trouble)."""
    try:
        write_atomically(_own_file(), lambda temp: temp.write_text(text, encoding="utf-8"))
    except OSError:
        pass


def clear(text: str) -> None:
    """Forget `text` once its reply is stored (a newer message kept since then stays)."""
    try:
        if _own_file().read_text(encoding="utf-8") == text:
            _own_file().unlink()
    except OSError:
        pass


def recover() -> list[str]:
    """The unanswered messages of processes that are no longer running (oldest first); their
    files are removed."""
    try:
        entries = sorted(folder().glob("*.txt"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return []
    texts = []
    for entry in entries:
        if not entry.stem.isdigit() or process_alive(int(entry.stem)):
            continue
        try:
            texts.append(entry.read_text(encoding="utf-8", errors="replace"))
            entry.unlink()
        except OSError:
            continue
    return [text for text in texts if text.strip()]
