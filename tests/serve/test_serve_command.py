"""`rwkv-chat serve` starting up: the options it refuses, a busy port, and its --help examples run as written."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from rwkv_chat.cli import cli

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rwkv_chat.cli", "serve", *args]


def user_env(home: Path) -> dict:
    """The environment of a user with an empty home (no config: the demo model) and no key set."""
    env = dict(os.environ, RWKV_CHAT_HOME=str(home), PYTHONPATH=str(ROOT))
    for name in ("RWKV_CHAT_API_KEY", "RWKV_CHAT_MODEL", "RWKV_CHAT_STRATEGY"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("args, env, needle", [
    (["--api-key", ""], {}, "the API key is empty"),
    ([], {"RWKV_CHAT_API_KEY": ""}, "RWKV_CHAT_API_KEY is set but empty"),
    (["--api-key", "pässwort"], {}, "the API key must be printable ASCII"),
    (["--api-key", "secret "], {}, "starts or ends with a space"),
    (["--host", ""], {}, "the host is empty"),
], ids=["empty-key", "empty-key-variable", "non-ascii-key", "key-ending-in-space", "empty-host"])
def test_an_unusable_key_or_host_is_refused_before_the_model_loads(tmp_path, args, env, needle):
    # a missing model file: had it been loaded first, the error would be about the file
    command = ["serve", "-m", str(tmp_path / "missing.pth"), "--port", str(free_port()), *args]
    result = CliRunner().invoke(cli, command, env={"RWKV_CHAT_HOME": str(tmp_path), "RWKV_CHAT_API_KEY": None, **env})
    assert result.exit_code == 2, result.output
    assert needle in result.output and "missing.pth" not in result.output, result.output


@pytest.mark.parametrize("model", [["--demo"], ["-m", "missing.pth"]], ids=["demo", "missing-model"])
def test_a_busy_port_fails_at_once_with_one_line(tmp_path, model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(serve_command(*model, "--port", str(port)), cwd=tmp_path, env=user_env(tmp_path),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"Error: port {port} on 127.0.0.1 is in use; pick another with --port\n"
    assert done.stdout == ""


def help_examples() -> list[str]:
    """The commands under "Examples:" in `rwkv-chat serve --help`, each on one line."""
    text = CliRunner().invoke(cli, ["serve", "--help"]).output
    block = text.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()]


def send_curl(command: str, port: int) -> httpx.Response:
    """A `curl URL [-H HEADER]... [-d BODY]` example, sent with httpx; its port 8000 replaced by `port`."""
    args = iter(shlex.split(command, comments=True)[1:])
    url, headers, body = None, {}, None
    for arg in args:
        if arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name] = value.strip()
        elif arg == "-d":
            body = next(args)
        else:
            url = arg
    assert url.startswith("http://127.0.0.1:8000/"), command  # where the first example serves
    url = url.replace(":8000/", f":{port}/", 1)
    return httpx.request("GET" if body is None else "POST", url, headers=headers, content=body, timeout=60)


def test_the_help_examples_work_as_written(tmp_path):
    examples = help_examples()
    first_serve = shlex.split(examples[0], comments=True)
    curls = [line for line in examples if line.startswith("curl ")]
    assert first_serve[:2] == ["rwkv-chat", "serve"] and "--port" not in first_serve
    assert any("/v1/chat/completions" in curl for curl in curls)
    port = free_port()
    proc = subprocess.Popen(serve_command(*first_serve[2:], "--port", str(port)), cwd=tmp_path,
                            env=user_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        banner = next((line for line in proc.stderr if line.startswith("Serving")), None)
        assert banner is not None, proc.wait(30)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the banner means it listens
        for curl in curls:
            response = send_curl(curl, port)
            assert response.status_code == 200, (curl, response.text)
    finally:
        proc.terminate()
        proc.wait(30)
