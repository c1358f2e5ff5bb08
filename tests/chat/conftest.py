"""Chat-layer fixtures: a user home folder per test, and rules for the scripted stand-in model
(tests/scripted_model.py) that write whole chat replies.  The tiny models, pipelines over them and
the scripted model itself are shared with the pipeline tests (tests/conftest.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from rwkv_chat.chat import locations


@pytest.fixture(autouse=True)
def chat_home(tmp_path, monkeypatch):
    """Every chat test gets its own user folders (RWKV_CHAT_HOME), never the real ones."""
    home = tmp_path / "home"
    monkeypatch.setenv(locations.HOME_ENV_VAR, str(home))
    return home


# ------------------------------------------------------------------ scripted replies
def after_last(text: str, marker: str) -> str | None:
    """The text after the last `marker`, or None when there is none."""
    index = text.rfind(marker)
    return None if index < 0 else text[index + len(marker):]


def replies_rule(*replies: str, marker: str = "Assistant:") -> Callable[[str], str]:
    """A rule that writes replies[n - 1] after the n-th `marker` (the last reply repeats)."""

    def rule(text: str) -> str:
        written = after_last(text, marker)
        if written is None:
            return ""
        target = replies[min(text.count(marker), len(replies)) - 1]
        return target[len(written):] if target.startswith(written) else ""

    return rule


@pytest.fixture(name="replies_rule")
def replies_rule_fixture():
    return replies_rule


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs folder (read-only or tiny); skips without root."""
    mounted = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        # lazy: a failed torch.save can leave its (deleted) temp file open until garbage collection
        done = subprocess.run(["umount", "-l", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def run_killed_during_save(call: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `call` (a save) in a fresh interpreter whose safetensors write puts part of a file on
    disk and then SIGKILLs the process; the chat modules are imported as `snapshot` and `store`."""
    script = textwrap.dedent("""
        import os, signal, torch
        from rwkv_chat.chat import snapshot
        from rwkv_chat.chat.store import ConversationStore

        def write_then_die(tensors, filename, metadata=None):
            with open(filename, "wb") as file:
                file.write(b"partial" * 1000)
                file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        snapshot.save_file = write_then_die
    """) + call
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, cwd=root, env=env)
