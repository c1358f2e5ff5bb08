"""Hostile and broken CLI inputs (issue #12): each is one line `Error: ...` on stderr naming the
file and the problem, exit status 2, never a hang; `--debug` shows the traceback instead."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_chat.cli import ExitCode, cli
from rwkv_chat.errors import RWKVChatError

LONG_NAME = "n" * 300  # one name over NAME_MAX (255 bytes)
LONG_PATH = "ab/" * 2000 + "model.pth"  # 6,009 bytes: over PATH_MAX (4096)


pytestmark = pytest.mark.usefixtures("no_hang")  # a blocked open() of a FIFO fails the test


def assert_one_line_error(result, *expected: str) -> str:
    assert result.exit_code == ExitCode.BAD_INPUT, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ special files: never opened


@pytest.mark.parametrize("args", [
    ["info", "{fifo}"],
    ["info", "{fifo_stem}"],  # the .pth suffix left out
    ["info", "--json", "{fifo}"],
    ["--model", "{fifo}"],
    ["--snapshot", "{fifo}"],
    ["--model", "{model}", "--state", "{fifo}"],
    ["generate", "-m", "{fifo}", "Hi"],
    ["generate", "-m", "{model}", "--state", "{fifo}", "Hi"],
    ["generate", "-m", "{model}", "--config", "{fifo}", "Hi"],
])
def test_fifo_is_refused_without_opening_it(runner, fifo, model_path, args):
    args = [a.format(fifo=fifo, fifo_stem=fifo.with_suffix(""), model=model_path) for a in args]
    result = runner.invoke(cli, args)
    assert_one_line_error(result, str(fifo), "is a FIFO (named pipe), not a regular file")


def test_fifo_snapshot_by_suffix(runner, tmp_path):
    path = tmp_path / "chat.rwkvchat"
    os.mkfifo(path)
    assert_one_line_error(runner.invoke(cli, ["info", str(path)]), str(path), "is a FIFO")


def test_device_and_directory_are_named(runner, tmp_path):
    assert_one_line_error(runner.invoke(cli, ["info", os.devnull]), os.devnull, "is a character device")
    assert_one_line_error(runner.invoke(cli, ["info", str(tmp_path)]), str(tmp_path), "is a directory")
    assert_one_line_error(runner.invoke(cli, ["generate", "-m", str(tmp_path), "Hi"]), "is a directory")


# ------------------------------------------------------------------ paths over the system's limits


@pytest.mark.parametrize("option", [["info"], ["--model"], ["generate", "-m"], ["--snapshot"]])
def test_name_over_255_bytes(runner, tmp_path, option):
    path = tmp_path / LONG_NAME
    line = assert_one_line_error(runner.invoke(cli, [*option, str(path)] + (["Hi"] if "generate" in option else [])),
                                 "a file or folder name in it is 300 bytes long, over the system's limit of 255")
    assert str(tmp_path) in line  # the file is named (shortened when very long)


@pytest.mark.parametrize("option", [["info"], ["--model"], ["--config"]])
def test_path_over_path_max(runner, option):
    line = assert_one_line_error(runner.invoke(cli, [*option, LONG_PATH]),
                                 "the path is 6009 bytes long, over the system's limit of")
    assert line.startswith("Error: ab/ab/ab/") and "..." in line and len(line) < 300


def test_state_path_over_the_limits(runner, model_path, tmp_path):
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "--state", str(tmp_path / LONG_NAME), "Hi"])
    assert_one_line_error(result, "300 bytes long")


# ------------------------------------------------------------------ prompts that are not text


def test_prompt_argument_that_is_not_utf8(runner, model_path):
    # Python keeps undecodable argv bytes as lone surrogates: b"\xff\xfeabc" arrives as this
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "\udcff\udcfeabc"])
    assert_one_line_error(result, "the PROMPT argument is not valid UTF-8 text (byte 0xff at character 0)")


def test_binary_stdin(runner, model_path):
    result = runner.invoke(cli, ["generate", "-m", str(model_path)], input=b"PK\x03\x04\x14\x00\x00\x00\xff\xfe\x00")
    assert_one_line_error(result, "stdin is not UTF-8 text (byte 0xff at offset 8)")


def test_endless_stdin_is_cut_off(runner, model_path, monkeypatch):
    monkeypatch.setattr("rwkv_chat.cli.MAX_STDIN_PROMPT", 1000)
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "-"], input=b"a" * 5000)
    assert_one_line_error(result, "stdin holds more than", "too long for a prompt")


# ------------------------------------------------------------------ --debug and the error family


@pytest.mark.parametrize("args", [["--debug", "info", "{fifo}"], ["info", "{long}", "--debug"],
                                  ["generate", "--debug", "-m", "{model}", "\udcffx"]])
def test_debug_raises_instead(runner, fifo, model_path, tmp_path, args):
    args = [a.format(fifo=fifo, long=tmp_path / LONG_NAME, model=model_path) for a in args]
    result = runner.invoke(cli, args)
    assert isinstance(result.exception, RWKVChatError)
    assert "Error: " not in result.stderr


def test_oserror_names_the_file_and_a_bug_is_one_line_with_status_1(runner, model_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("rwkv_chat.cli.describe_file", denied)
    assert_one_line_error(runner.invoke(cli, ["info", str(model_path)]), f"Error: {model_path}: Permission denied")

    def bug(path):
        raise TypeError("unsupported operand\nsecond line")

    monkeypatch.setattr("rwkv_chat.cli.describe_file", bug)
    result = runner.invoke(cli, ["info", str(model_path)])
    assert result.exit_code == ExitCode.FAILED
    assert result.stderr.strip() == ("Error: unexpected TypeError: unsupported operand second line "
                                     "(a bug in rwkv-chat; --debug shows the traceback)")
    result = runner.invoke(cli, ["--debug", "info", str(model_path)])
    assert isinstance(result.exception, TypeError)


def test_real_process_on_a_fifo_ends_with_one_line(fifo, tmp_path):
    """End to end, as a user runs it: no hang, status 2, one line; --debug prints a traceback."""
    env = {**os.environ, "RWKV_CHAT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = [sys.executable, "-m", "rwkv_chat.cli", "info", str(fifo)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert done.stderr == f"Error: {fifo}: is a FIFO (named pipe), not a regular file\n"
    done = subprocess.run([*run, "--debug"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and "Traceback" in done.stderr and "NotARegularFileError" in done.stderr


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """`rwkv-chat generate ... | head -c 5`: no "Error: Broken pipe", the SIGPIPE status."""
    env = {**os.environ, "RWKV_CHAT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = [sys.executable, "-m", "rwkv_chat.cli", "generate", "--demo", "-n", "400", "Once upon a time"]
    process = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(process.stdout.read(5)) == 5
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == ExitCode.PIPE_CLOSED
    assert "Error" not in stderr and "Traceback" not in stderr, stderr
