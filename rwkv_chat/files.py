"""File helpers every layer shares: atomic writes and code-free tensor loading."""
from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# temp files are named ".{target name}.{pid}.{random}.tmp": the pid tells whether their writer still runs
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")  # written before temp names carried the pid
OLD_TEMP_AGE_S = 3600.0  # such a file untouched this long belongs to no running save


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` for a temp file in the folder of `path`, flush it to disk, then
    move it over `path` with os.replace, so readers see the old file or the new one, never a
    half-written one. The temp file is removed when `write` fails (or is interrupted)."""
    path = Path(path)
    temp = _write_temp(path, write)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def write_new_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Like `write_atomically`, but never replaces an existing file: when `path` is taken, the
    first free name of "stem-2.suffix", "stem-3.suffix", ... is used. Two processes writing the
    same name at once both keep their files. Returns the path written."""
    path = Path(path)
    temp = _write_temp(path, write)
    try:
        counter = 2
        candidate = path
        while True:
            try:
                os.link(temp, candidate)  # atomic and fails when the name exists
                break
            except FileExistsError:
                candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
                counter += 1
            except OSError as error:  # a file system without hard links
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                candidate = _claim_by_exclusive_create(path, temp)
                break
    finally:
        temp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return candidate


def _claim_by_exclusive_create(path: Path, temp: Path) -> Path:
    counter, candidate = 2, path
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
            counter += 1
            continue
        os.replace(temp, candidate)
        return candidate


def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening folders)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def is_temp_file(path: Path) -> bool:
    return _TEMP_NAME.match(path.name) is not None


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files in `folder` left by writers that are no longer running (a killed
    save); returns them. Files of running processes are left alone; a temp name without a pid
    (older versions) goes once it is OLD_TEMP_AGE_S old."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is not None:
            if _process_alive(int(match.group(1))):
                continue
        elif not _OLD_TEMP_NAME.match(entry.name) or not _older_than(entry, OLD_TEMP_AGE_S):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: leave it
    return True


def load_tensors(path: str | os.PathLike):
    """torch.load with weights_only (no pickled code runs), memory-mapped when the file's format
    allows it (the legacy non-zip format does not)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)
