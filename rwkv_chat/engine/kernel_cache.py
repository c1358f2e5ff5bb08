"""A private, verified cache for compiled kernel libraries.

A shared library runs as the user who loads it, so the cache must never hand back a file
another user could have written. The rules:

- The cache is a folder owned by the user and writable by no one else (created 0700). A folder
  that is a symlink, owned by someone else or group/world-writable is refused (`UnsafeCacheError`
  says why) and the caller falls back to plain torch.
- A library is compiled under a temporary name inside that folder and renamed into place
  atomically; the SHA-256 of the built file is recorded beside it in `<library>.json`.
- Loading opens the file without following symlinks, checks the open file (a regular file owned
  by the user, not group/world-writable, hash as recorded) and hands the loader that very file
  (`/proc/self/fd/N` on Linux), so it cannot be swapped between the check and the load.
- A zero-byte, damaged or unrecorded library is rebuilt; the compiler runs under a timeout
  (`RWKV_CHAT_CC_TIMEOUT` seconds, default 120) and `CC` naming a missing compiler is an error,
  never a silent switch to another compiler.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# the kernel sources (CUDA, and C in cpu/): rwkv_chat/kernels, a link to kernels/ in a source checkout
# and a copy (package data) in an installed wheel; kernels/ beside the package where the link is lost
KERNEL_DIR = next((d for d in (_PACKAGE_ROOT / "kernels", _PACKAGE_ROOT.parent / "kernels") if d.is_dir()),
                  _PACKAGE_ROOT / "kernels")
TIMEOUT_ENV = "RWKV_CHAT_CC_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER_HINT = "point RWKV_CHAT_KERNEL_DIR at a folder only you can write"
_FILE_HINT = "delete it and rwkv-chat builds its own"


class KernelCacheError(RuntimeError):
    """The kernels cannot be built or loaded; the caller uses the plain-torch path."""


class UnsafeCacheError(KernelCacheError):
    """A cache folder or file could have been written by someone else."""


def default_root() -> Path:
    """`RWKV_CHAT_KERNEL_DIR`, else `<user cache dir>/rwkv-chat/kernels`."""
    override = os.environ.get("RWKV_CHAT_KERNEL_DIR", "").strip()
    if override:
        return Path(os.path.expanduser(override))
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("rwkv-chat")) / "kernels"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "rwkv-chat" / "kernels"


def _unsafe_reason(info: os.stat_result, what: str) -> str | None:
    """Why a file or folder with this lstat/fstat result may not be trusted, or None."""
    if stat.S_ISLNK(info.st_mode):
        return f"{what} is a symbolic link"
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return f"{what} is owned by user id {info.st_uid}, not by you (user id {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by other users (mode {stat.filemode(info.st_mode)})"
    return None


def private_folder(path: str | os.PathLike) -> Path:
    """`path` as a folder only the user can write: created 0700 when missing (parents too),
    else checked. UnsafeCacheError names the problem when it is a symlink, not a folder, owned
    by someone else or group/world-writable."""
    folder = Path(path)
    try:
        if not os.path.lexists(folder):
            folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                pass  # another process made it first: checked below like any existing folder
        info = os.lstat(folder)
    except OSError as error:
        raise KernelCacheError(f"cannot create the kernel cache folder {folder} ({error.strerror or error})") from error
    if not stat.S_ISLNK(info.st_mode) and not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheError(f"kernel cache {folder} is not a folder")
    reason = _unsafe_reason(info, f"kernel cache folder {folder}")
    if reason:
        raise UnsafeCacheError(f"refusing to use it: {reason}; {_FOLDER_HINT}")
    return folder


def _open_folder(folder: Path) -> int:
    """An fd of the checked folder (O_NOFOLLOW), re-checked through the fd itself."""
    fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    reason = _unsafe_reason(os.fstat(fd), f"kernel cache folder {folder}")
    if reason:
        os.close(fd)
        raise UnsafeCacheError(f"refusing to use it: {reason}; {_FOLDER_HINT}")
    return fd


def compiler() -> list[str]:
    """The C compiler command: `CC` when set (KernelCacheError when it names no program),
    else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        words = shlex.split(cc)
        found = shutil.which(words[0]) if words else None
        if found is None:
            raise KernelCacheError(f"CC={cc!r} names a compiler that is not installed or not on PATH "
                                   "(unset CC to use the system's cc)")
        return [found, *words[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise KernelCacheError("no C compiler (cc, gcc or clang) on PATH")


def compiler_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise KernelCacheError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise KernelCacheError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def run_compiler(args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the compiler in its own process group; the whole group is killed after `timeout`
    seconds (a wrapper script's children too) and KernelCacheError says so."""
    timeout = compiler_timeout() if timeout is None else timeout
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True)
    except OSError as error:
        raise KernelCacheError(f"cannot run the compiler {args[0]} ({error.strerror or error})") from error
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (OSError, AttributeError):
            process.kill()
        process.communicate()
        raise KernelCacheError(f"the compiler {args[0]} did not finish within {timeout:g} s "
                               f"({TIMEOUT_ENV} sets the limit)") from None
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return digest.hexdigest()


def _read_record(dir_fd: int, name: str) -> dict | None:
    """The `<name>.json` record, or None when missing or unusable (not ours, damaged)."""
    try:
        fd = os.open(f"{name}.json", os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or _unsafe_reason(info, name) or info.st_size > 4096:
            return None
        record = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


class Library:
    """A verified library file held open: `load_path` is what to give dlopen/ctypes.CDLL."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path
        self.load_path = f"/proc/self/fd/{fd}" if sys.platform.startswith("linux") else str(path)

    def close(self) -> None:
        os.close(self.fd)


def open_verified(folder: Path, name: str) -> Library | None:
    """The library `name` in `folder`, opened and checked; None when it is missing or broken
    (zero bytes, no hash record, hash mismatch): the caller rebuilds it. UnsafeCacheError when
    the entry could be someone else's (symlink, other owner, writable by others)."""
    dir_fd = _open_folder(folder)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if os.path.islink(folder / name):
                raise UnsafeCacheError(f"refusing to load {folder / name}: it is a symbolic link; {_FILE_HINT}") from None
            raise KernelCacheError(f"cannot open {folder / name} ({error.strerror or error})") from error
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeCacheError(f"refusing to load {folder / name}: not a regular file; {_FILE_HINT}")
            reason = _unsafe_reason(info, str(folder / name))
            if reason:
                raise UnsafeCacheError(f"refusing to load it: {reason}; {_FILE_HINT}")
            record = _read_record(dir_fd, name)
            if info.st_size == 0 or record is None or record["sha256"] != _sha256_fd(fd):
                os.close(fd)
                return None
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        return Library(fd, folder / name)
    finally:
        os.close(dir_fd)


def build(folder: Path, name: str, source: str, compile_args: list[str]) -> Library:
    """Compile `source` (C) with `compile_args` (flags, with `{src}` and `{out}` placeholders)
    into `folder/name`: built under a temporary name in the folder, hash recorded in
    `name.json`, both renamed into place atomically. Returns the new file, held open from
    before the rename, so a concurrent build of the same entry cannot swap it."""
    cc = compiler()
    dir_fd = _open_folder(folder)
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
            src, out = Path(tmp, "source.c"), Path(tmp, "library.so")
            src.write_text(source)
            args = [arg.format(src=src, out=out) for arg in compile_args]
            proc = run_compiler([*cc, *args])
            if proc.returncode != 0 or not out.is_file():
                raise KernelCacheError(f"compiling the kernels failed: {(proc.stderr or proc.stdout)[-2000:]}")
            fd = os.open(out, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            library = Library(fd, folder / name)
            size, digest = os.fstat(fd).st_size, _sha256_fd(fd)
            if size == 0:
                library.close()
                raise KernelCacheError("the compiler wrote an empty library")
            os.chmod(out, 0o700)
            record = Path(tmp, "record.json")
            record.write_text(json.dumps({"sha256": digest, "size": size}))
            os.chmod(record, 0o600)
            tmp_fd = os.open(tmp, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
            try:
                # the record first: a library without a matching record is rebuilt, never trusted
                os.replace("record.json", f"{name}.json", src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)
                os.replace("library.so", name, src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)
            except BaseException:
                library.close()
                raise
            finally:
                os.close(tmp_fd)
            return library
    except OSError as error:
        raise KernelCacheError(f"cannot build into {folder} ({error.strerror or error})") from error
    finally:
        os.close(dir_fd)


def load_or_build(folder: Path, name: str, source: str, compile_args: list[str], loader):
    """`loader(library)` of the cached `folder/name`, building it first when missing or broken
    (a new build replaces the entry atomically). A verified library that still fails to load
    is rebuilt once."""
    folder = private_folder(folder)
    for attempt in range(2):
        library = open_verified(folder, name) if attempt == 0 else None
        if library is None:
            library = build(folder, name, source, compile_args)
        try:
            return loader(library)  # the loader keeps library.fd open while the library is in use
        except OSError as error:
            library.close()
            if attempt:
                raise KernelCacheError(f"cannot load {folder / name} ({error})") from error
    raise AssertionError("unreachable")
