"""File helpers every layer shares: atomic writes (never-overwriting ones too), cleanup of temp files a
killed save left, code-free tensor loading, advisory locks, and the check that a user-named path is a
regular file before anything opens it."""
from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import FileWriteError, ModelLoadError, NotARegularFileError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# temp files are named ".{target name}.{pid}.{random}.tmp": the pid tells whether their writer still runs
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")  # written before temp names carried the pid
OLD_TEMP_AGE_S = 3600.0  # such a file untouched this long belongs to no running save


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
    with _write_errors(path):
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
    with _write_errors(path):
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


@contextmanager
def _write_errors(path: Path):
    """Turn a failed write into FileWriteError naming `path` and the system's reason; a bug in
    the writer passes through unchanged."""
    try:
        yield
    except BaseException as error:
        reason = None if isinstance(error, FileWriteError) else _os_reason(error, path.parent)
        if reason is None:
            raise
        raise _write_failure(path, reason) from error


def _write_failure(path: Path, reason: tuple[int, str]) -> FileWriteError:
    failure = FileWriteError(f"{display_path(path)}: cannot write it ({reason[1]})")
    failure.errno, failure.reason = reason
    return failure


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the folder should be
        raise NotADirectoryError(errno.ENOTDIR, f"{display_path(path.parent)} is not a folder") from None
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
    except BaseException as error:
        reason = _os_reason(error, path.parent)  # before the unlink frees the space it took
        try:
            temp.unlink(missing_ok=True)
        except OSError:
            pass
        if reason is None:
            raise
        raise _write_failure(path, reason) from error
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
            if process_alive(int(match.group(1))):
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


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: leave it
    return True


def try_lock(path: str | os.PathLike) -> int | None:
    """An exclusive advisory lock on `path` (created, private, if missing): the descriptor that
    holds it, or None when another holder has it. The system drops it when its process ends,
    however it ends. Two descriptors conflict even within one process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        os.close(fd)
        return None
    return fd


def release_lock(fd: int) -> None:
    """Let go of a lock try_lock took."""
    try:
        if fcntl is None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass
    finally:
        os.close(fd)


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
