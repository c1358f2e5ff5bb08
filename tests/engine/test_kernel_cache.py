"""The kernel cache never loads a library someone else could have written, rebuilds broken
entries, and bounds or refuses a bad compiler (rwkv_chat/engine/kernel_cache.py)."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from rwkv_chat.engine import cpu_kernels, cuda, kernel_cache

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("cc") is None,
                                reason="needs Linux and a C compiler")

# A tiny library: marker() tells which build was loaded; a planted one also leaves a file behind
# from its constructor, which runs the moment the library is loaded.
GOOD = "int marker(void) { return 42; }\n"
PLANTED = """
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void ran(void) {
    const char *path = getenv("RWKV_TEST_PLANTED_MARK");
    if (path) close(open(path, O_CREAT | O_WRONLY, 0600));
}
int marker(void) { return 666; }
"""
ARGS = ["-shared", "-fPIC", "{src}", "-o", "{out}"]


def compile_to(path: Path, source: str) -> Path:
    src = path.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    src.unlink()
    return path


def load_marker(library: kernel_cache.Library) -> int:
    return ctypes.CDLL(library.load_path).marker()


@pytest.fixture
def folder(tmp_path) -> Path:
    return tmp_path / "cache" / "kernels"


@pytest.fixture
def mark(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "planted-library-ran"
    monkeypatch.setenv("RWKV_TEST_PLANTED_MARK", str(path))
    return path


@pytest.fixture
def kernels_env(folder, monkeypatch):
    """cpu_kernels.get() building into `folder`, starting afresh (and afresh again afterwards)."""
    monkeypatch.setenv("RWKV_CHAT_KERNEL_DIR", str(folder))
    monkeypatch.delenv("RWKV_CPU_KERNELS", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_kernels, "_loaded", False)  # not tried yet (restored afterwards)
    yield folder


def get_with_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = cpu_kernels.get()
    return kernels, " ".join(str(w.message) for w in caught)


def real_library_name() -> str:
    return cpu_kernels.library_name(kernel_cache.compiler())


def test_build_records_the_hash_in_a_private_folder_and_loads_the_verified_file(folder):
    assert kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker) == 42
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    record = json.loads((folder / "m.so.json").read_text())
    assert record["sha256"] == hashlib.sha256((folder / "m.so").read_bytes()).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == ["m.so", "m.so.json"]  # no temp files left
    library = kernel_cache.open_verified(folder, "m.so")
    assert library.load_path == f"/proc/self/fd/{library.fd}"
    assert os.path.samefile(library.load_path, folder / "m.so")
    library.close()


def test_a_cached_library_is_not_compiled_again(folder, monkeypatch):
    kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker)
    monkeypatch.setattr(kernel_cache, "run_compiler", lambda *a, **k: pytest.fail("compiled again"))
    assert kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker) == 42


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_ready_says_whether_a_first_use_compiles(kernels_env):
    """The CLI announces the compile (seconds, once per machine) when ready() is False."""
    assert not cpu_kernels.ready()
    kernels, problems = get_with_warnings()
    assert kernels is not None and not problems
    assert cpu_kernels.ready()
    cpu_kernels._loaded = False  # another process: the library is in the cache now
    assert cpu_kernels.ready()


def test_library_planted_by_another_user_never_runs(kernels_env, mark):
    """The attack of issue #12: another user puts a library under the predictable cache name."""
    name = real_library_name()
    kernels_env.mkdir(parents=True, mode=0o700)
    planted = compile_to(kernels_env / name, PLANTED)
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    (kernels_env / f"{name}.json").write_text(json.dumps({"sha256": digest}))  # even with a matching record
    os.chown(planted, 12345, 12345)
    kernels, said = get_with_warnings()
    assert kernels is None
    assert "owned by user id 12345" in said and name in said
    assert not mark.exists()


def test_world_writable_library_is_refused(kernels_env, mark):
    name = real_library_name()
    kernels_env.mkdir(parents=True, mode=0o700)
    planted = compile_to(kernels_env / name, PLANTED)
    (kernels_env / f"{name}.json").write_text(json.dumps({"sha256": hashlib.sha256(planted.read_bytes()).hexdigest()}))
    planted.chmod(0o777)
    kernels, said = get_with_warnings()
    assert kernels is None and "writable by other users" in said
    assert not mark.exists()


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
def test_group_or_world_writable_folder_is_refused(kernels_env, mode):
    kernels_env.mkdir(parents=True)
    kernels_env.chmod(mode)
    kernels, said = get_with_warnings()
    assert kernels is None
    assert f"kernel cache folder {kernels_env} is writable by other users" in said
    assert list(kernels_env.iterdir()) == []  # nothing was built there either


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_folder_owned_by_another_user_is_refused(folder):
    folder.mkdir(parents=True, mode=0o700)
    os.chown(folder, 12345, 12345)
    with pytest.raises(kernel_cache.UnsafeCacheError, match="owned by user id 12345"):
        kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker)


def test_symlinked_folder_is_refused(tmp_path, folder):
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    folder.parent.mkdir(parents=True)
    folder.symlink_to(real)
    with pytest.raises(kernel_cache.UnsafeCacheError, match="symbolic link"):
        kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker)
    assert list(real.iterdir()) == []


def test_symlinked_library_is_refused(kernels_env, tmp_path, mark):
    name = real_library_name()
    kernels_env.mkdir(parents=True, mode=0o700)
    target = compile_to(tmp_path / "target.so", PLANTED)
    (kernels_env / name).symlink_to(target)
    (kernels_env / f"{name}.json").write_text(json.dumps({"sha256": hashlib.sha256(target.read_bytes()).hexdigest()}))
    kernels, said = get_with_warnings()
    assert kernels is None and "symbolic link" in said
    assert not mark.exists()


def test_library_whose_hash_differs_from_the_record_is_rebuilt(folder, mark):
    kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker)
    record = (folder / "m.so.json").read_text()
    compile_to(folder / "m.so", PLANTED)  # replaced after the build; the record is the old one
    (folder / "m.so").chmod(0o700)
    assert (folder / "m.so.json").read_text() == record
    assert kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker) == 42
    assert not mark.exists()
    assert json.loads((folder / "m.so.json").read_text())["sha256"] == \
        hashlib.sha256((folder / "m.so").read_bytes()).hexdigest()


@pytest.mark.parametrize("content", [b"", b"\x7fELF garbage" * 10])
def test_zero_byte_or_garbage_library_is_rebuilt(folder, content):
    folder.mkdir(parents=True, mode=0o700)
    (folder / "m.so").write_bytes(content)
    # even a record that matches the garbage: loading fails, so the entry is rebuilt once
    (folder / "m.so.json").write_text(json.dumps({"sha256": hashlib.sha256(content).hexdigest()}))
    assert kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker) == 42
    assert (folder / "m.so").stat().st_size > 1000


def test_library_without_a_record_is_rebuilt(folder, mark):
    folder.mkdir(parents=True, mode=0o700)
    compile_to(folder / "m.so", PLANTED)
    assert kernel_cache.load_or_build(folder, "m.so", GOOD, ARGS, load_marker) == 42
    assert not mark.exists()


def test_cc_naming_a_missing_compiler_warns_and_uses_no_other(kernels_env, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernels, said = get_with_warnings()
    assert kernels is None
    assert "CC='/nonexistent/cc' names a compiler that is not installed" in said
    assert not kernels_env.exists() or list(kernels_env.iterdir()) == []


def test_hanging_compiler_is_stopped_after_the_timeout(kernels_env, tmp_path, monkeypatch):
    fake = tmp_path / "slow-cc"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(kernel_cache.TIMEOUT_ENV, "0.5")
    started = time.monotonic()
    kernels, said = get_with_warnings()
    assert time.monotonic() - started < 5
    assert kernels is None
    assert f"the compiler {fake} did not finish within 0.5 s" in said and kernel_cache.TIMEOUT_ENV in said


def test_bad_timeout_value_is_named(monkeypatch):
    monkeypatch.setenv(kernel_cache.TIMEOUT_ENV, "soon")
    with pytest.raises(kernel_cache.KernelCacheError, match="RWKV_CHAT_CC_TIMEOUT='soon'"):
        kernel_cache.compiler_timeout()


def test_cuda_build_folder_follows_the_same_rules(tmp_path, monkeypatch):
    root = tmp_path / "kernels"
    monkeypatch.setenv("RWKV_CHAT_KERNEL_DIR", str(root))
    built = cuda.build_folder("rwkv_chat_ops")
    assert built == root / "cuda-rwkv_chat_ops"
    assert stat.S_IMODE(root.stat().st_mode) == stat.S_IMODE(built.stat().st_mode) == 0o700
    built.chmod(0o777)
    with pytest.raises(kernel_cache.UnsafeCacheError, match="writable by other users"):
        cuda.build_folder("rwkv_chat_ops")
    built.rmdir()
    built.symlink_to(tmp_path)
    with pytest.raises(kernel_cache.UnsafeCacheError, match="symbolic link"):
        cuda.build_folder("rwkv_chat_ops")


def test_concurrent_first_builds_all_load(folder):
    """Several processes starting at once on an empty or broken cache all end with the kernels."""
    folder.mkdir(parents=True, mode=0o700)
    (folder / "m.so").write_bytes(b"")  # broken entry: every process rebuilds it at the same time
    script = ("import ctypes, sys\nfrom pathlib import Path\nfrom rwkv_chat.engine import kernel_cache\n"
              "print(kernel_cache.load_or_build(Path(sys.argv[1]), 'm.so', sys.argv[2], sys.argv[3:], "
              "lambda lib: ctypes.CDLL(lib.load_path).marker()))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(folder), GOOD, *ARGS], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=60) for p in processes]
    assert [out.strip() for out, _ in results] == ["42"] * 4, results
    assert sorted(p.name for p in folder.iterdir()) == ["m.so", "m.so.json"]
