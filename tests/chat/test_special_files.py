"""The Python API on special files and failed writes (issue #12): a FIFO, device or folder is
refused by name before anything opens it (no hang), and a write that fails says which file and
why (read-only folder, full disk) with FileWriteError."""
from __future__ import annotations

import errno
import re
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from rwkv_chat import RWKV, Pipeline
from rwkv_chat.chat import list_state_files, read_state_file_info, save_state_file
from rwkv_chat.chat import snapshot as snapshots
from rwkv_chat.config import ConfigError, load_config
from rwkv_chat.chat.session import ChatSession
from rwkv_chat.errors import FileWriteError, NotARegularFileError, RWKVChatError, SnapshotError
from rwkv_chat.files import regular_file_problem, write_atomically
from rwkv_chat.sampling import SamplingSettings


pytestmark = pytest.mark.usefixtures("no_hang")  # a blocked open() of a FIFO fails the test


FIFO_MESSAGE = "is a FIFO (named pipe), not a regular file"


def test_regular_file_problem_names_each_kind(tmp_path, fifo):
    regular = tmp_path / "file.pth"
    regular.write_bytes(b"x")
    assert regular_file_problem(regular) is None
    assert regular_file_problem(fifo) == f"{fifo}: {FIFO_MESSAGE}"
    assert regular_file_problem(os.devnull) == f"{os.devnull}: is a character device, not a regular file"
    assert regular_file_problem(tmp_path) == f"{tmp_path}: is a directory, not a regular file"
    assert regular_file_problem(tmp_path / "gone", "state file") == f"{tmp_path / 'gone'}: no such state file"
    assert "over the system's limit of 255" in regular_file_problem(tmp_path / ("x" * 300))
    link = tmp_path / "link.pth"
    link.symlink_to(regular)
    assert regular_file_problem(link) is None  # the user's own links are followed


def test_model_from_a_fifo(fifo):
    for path in (fifo, fifo.with_suffix("")):  # also when found by adding .pth
        with pytest.raises(NotARegularFileError, match=re.escape(FIFO_MESSAGE)):
            RWKV(path, progress=None)


def test_state_file_from_a_fifo(load_model, fifo, tmp_path):
    with pytest.raises(NotARegularFileError, match=re.escape(FIFO_MESSAGE)):
        load_model("7").load_state(fifo)
    with pytest.raises(NotARegularFileError, match=re.escape(FIFO_MESSAGE)):
        read_state_file_info(fifo)
    listed = list_state_files([tmp_path])  # a FIFO in the states folder is listed as unusable
    assert [(info.path, info.problem) for info in listed] == [(fifo, FIFO_MESSAGE)]


def test_snapshot_from_a_fifo(load_model, tmp_path):
    path = tmp_path / "chat.rwkvchat"
    os.mkfifo(path)
    for read in (snapshots.read_snapshot, snapshots.read_snapshot_data):
        with pytest.raises(SnapshotError, match=re.escape(FIFO_MESSAGE)):
            read(path)
    with pytest.raises(SnapshotError, match=re.escape(FIFO_MESSAGE)):
        ChatSession.open(Pipeline(load_model("7")), path)


def test_config_from_a_fifo(fifo):
    with pytest.raises(ConfigError, match=re.escape(FIFO_MESSAGE)):
        load_config(fifo)


# ------------------------------------------------------------------ writes that fail


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_state_file_into_a_read_only_folder(load_model, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    with pytest.raises(FileWriteError, match=r"locked/s\.pth: cannot write it \(Permission denied\)"):
        save_state_file(load_model("7").zero_state(), folder / "s.pth")


def test_state_file_on_a_read_only_file_system(load_model, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(FileWriteError) as refused:
        save_state_file(load_model("7").zero_state(), tmp_path / "s.pth")
    assert str(refused.value) == f"{tmp_path / 's.pth'}: cannot write it (Read-only file system)"
    assert refused.value.errno == errno.EROFS and isinstance(refused.value, OSError)


def test_folder_that_is_a_file(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(FileWriteError, match="notes is not a folder"):
        write_atomically(tmp_path / "notes" / "s.pth", lambda temp: temp.write_bytes(b"x"))


def test_snapshot_save_on_a_full_disk(load_model, tmp_path, monkeypatch):
    session = ChatSession(Pipeline(load_model("7")), SamplingSettings(max_tokens=2))
    list(session.send("hi"))

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(snapshots, "save_file", disk_full)
    target = tmp_path / "chat.rwkvchat"
    with pytest.raises(SnapshotError) as refused:
        session.save(target)
    assert str(refused.value) == f"{target}: cannot save the conversation (the disk is full)"
    assert list(tmp_path.iterdir()) == []  # no partial or temp file left


def test_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    class Full:
        f_bavail = 0

    def torch_fails(temp):
        torch.save({"a": torch.zeros(4)}, temp)
        monkeypatch.setattr(os, "statvfs", lambda _: Full())
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(FileWriteError, match=r"cannot write it \(No space left on device\)") as refused:
        write_atomically(tmp_path / "s.pth", torch_fails)
    assert refused.value.errno == errno.ENOSPC


def test_a_bug_in_the_writer_is_not_disguised(tmp_path):
    def buggy(temp):
        raise TypeError("bad argument")

    with pytest.raises(TypeError, match="bad argument"):
        write_atomically(tmp_path / "s.pth", buggy)
    with pytest.raises(RuntimeError, match="not about files"):
        write_atomically(tmp_path / "s.pth", lambda temp: (_ for _ in ()).throw(RuntimeError("not about files")))
    assert list(tmp_path.iterdir()) == []


def test_new_errors_are_in_the_family():
    assert issubclass(FileWriteError, RWKVChatError) and issubclass(FileWriteError, OSError)
    assert issubclass(NotARegularFileError, RWKVChatError)


# ------------------------------------------------------------------ the same on real file systems (root only)


def test_real_read_only_file_system(load_model, mount_tmpfs):
    folder = mount_tmpfs("ro,size=1m")
    with pytest.raises(FileWriteError) as refused:
        save_state_file(load_model("7").zero_state(), folder / "s.pth")
    assert str(refused.value) == f"{folder / 's.pth'}: cannot write it (Read-only file system)"


def test_real_full_disk(load_model, mount_tmpfs):
    folder = mount_tmpfs("size=64k")
    state = load_model("7", (2, 128)).zero_state()  # 2 x [2, 64, 64] float32: 64 KB, more than fits
    with pytest.raises(FileWriteError, match=re.escape(f"{folder / 's.pth'}: cannot write it (No space left on device)")):
        save_state_file(state, folder / "s.pth")
    session = ChatSession(Pipeline(load_model("7", (2, 128))), SamplingSettings(max_tokens=2))
    list(session.send("hi"))
    with pytest.raises(SnapshotError, match=re.escape("cannot save the conversation (the disk is full)")):
        session.save(folder / "chat.rwkvchat")
    assert list(folder.iterdir()) == []
