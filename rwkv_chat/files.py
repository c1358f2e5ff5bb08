"""File helpers every layer shares: atomic writes, code-free tensor loading, and the check that
a user-named path is a regular file before anything opens it."""
from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import FileWriteError, ModelLoadError, NotARegularFileError

_SPECIAL_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))


def display_path(path: str | os.PathLike, limit: int = 200) -> str:
    """`path` for a message: a long path keeps its start (most of the folder) and its end
    around an ellipsis."""
    text = os.fsdecode(path)
    head = limit * 2 // 3
    return text if len(text) <= limit else f"{text[:head]}...{text[-(limit - head - 3):]}"


def _limit(name: str, default: int) -> int:
    try:
        return os.pathconf("/", name)
    except (OSError, ValueError, AttributeError):
        return default


def _too_long(path: str | os.PathLike) -> str:
    """Which limit a path over the system's limits breaks: a name over NAME_MAX or the whole
    path over PATH_MAX."""
    raw = os.fsencode(path)
    longest = max(len(part) for part in raw.split(b"/"))
    name_max = _limit("PC_NAME_MAX", 255)
    if longest > name_max:
        return f"a file or folder name in it is {longest} bytes long, over the system's limit of {name_max}"
    return f"the path is {len(raw)} bytes long, over the system's limit of {_limit('PC_PATH_MAX', 4096)}"


def regular_file_problem(path: str | os.PathLike, what: str = "file") -> str | None:
    """None when `path` is a regular file (symlinks followed), else a message naming the path and
    why it cannot be read: missing, a directory, a FIFO, a device, a socket, or the system's
    reason (a name over 255 bytes, a path over PATH_MAX, no permission). Never opens the file,
    so a FIFO cannot block."""
    shown = display_path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"{shown}: no such {what}"
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            return f"{shown}: cannot be used ({_too_long(path)})"
        return f"{shown}: cannot be used ({error.strerror or error})"
    except ValueError as error:  # an embedded NUL byte
        return f"{shown}: cannot be used ({error})"
    if stat.S_ISREG(info.st_mode):
        return None
    kind = next((name for test, name in _SPECIAL_KINDS if test(info.st_mode)), "a special file")
    return f"{shown}: is {kind}, not a regular file"


def check_regular_file(path: str | os.PathLike, what: str = "file", error: type[Exception] | None = None) -> None:
    """Raise `error` with regular_file_problem's message unless `path` is a regular file; by
    default NotARegularFileError for a FIFO/device/socket/folder, ModelLoadError otherwise."""
    problem = regular_file_problem(path, what)
    if problem is None:
        return
    if error is None:
        error = NotARegularFileError if problem.endswith("not a regular file") else ModelLoadError
    raise error(problem)


def _os_reason(error: BaseException, folder: Path) -> tuple[int, str] | None:
    """(errno, reason) of a failed write: an OSError's, or the OS error a library wraps
    (safetensors: "... (os error 28)"), or a RuntimeError of torch.save on a full disk; None for
    anything else (a bug in the writer is not hidden)."""
    if isinstance(error, OSError):
        return error.errno or errno.EIO, error.strerror or str(error)
    text = str(error)
    match = re.search(r"Os \{ code: (\d+)|os error (\d+)", text)
    if match:
        code = int(match.group(1) or match.group(2))
        return code, os.strerror(code)
    if not isinstance(error, RuntimeError):
        return None
    try:
        full = os.statvfs(folder).f_bavail == 0  # torch.save on a full disk: "unexpected pos 576 vs 534"
    except OSError:
        full = False
    if full:
        return errno.ENOSPC, os.strerror(errno.ENOSPC)
    if re.search(r"write failed|failed writing", text):
        return errno.EIO, "the write failed"
    return None


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` for a temp file in the folder of `path`, flush it to disk, then
    move it over `path` with os.replace, so readers see the old file or the new one, never a
    half-written one. The temp file is removed when `write` fails (or is interrupted).
    FileWriteError names the file and the system's reason (read-only folder, full disk, ...)."""
    path = Path(path)
    temp: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where the folder should be
            raise NotADirectoryError(errno.ENOTDIR, f"{display_path(path.parent)} is not a folder") from None
        descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(descriptor)
        temp = Path(temp_name)
        write(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as error:
        reason = None if isinstance(error, FileWriteError) else _os_reason(error, path.parent)  # before the unlink
        if temp is not None:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
        if reason is None:
            raise
        failure = FileWriteError(f"{display_path(path)}: cannot write it ({reason[1]})")
        failure.errno, failure.reason = reason
        raise failure from error
    return path


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
