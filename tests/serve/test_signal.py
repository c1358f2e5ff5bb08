"""`rwkv-chat serve` as a user runs it: a child process that a SIGTERM stops cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def model_that_never_ends(path: Path) -> Path:
    """A v7 checkpoint whose end-of-text token is never sampled: the final layer norm outputs a
    constant vector of ones, and the head's row for token 0 sums it to -64."""
    checkpoint = make_checkpoint("7", 2, 64)
    checkpoint["ln_out.weight"].zero_()
    checkpoint["ln_out.bias"].fill_(1.0)
    checkpoint["head.weight"][0].fill_(-1.0)
    return save_checkpoint(path, checkpoint)


def test_sigterm_ends_open_streams_and_exits(tmp_path):
    port = free_port()
    env = dict(os.environ, RWKV_CHAT_HOME=str(tmp_path), PYTHONPATH=str(ROOT), RWKV_CHAT_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_chat.cli", "serve", "-m", str(model_that_never_ends(tmp_path / "never-ends.pth")),
                             "-s", "cpu fp32", "--port", str(port), "--max-tokens", "100000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            assert time.monotonic() < deadline
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        body = {"prompt": "Go", "max_tokens": 100000, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/completions", json=body,
                                                           headers=headers) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal after its orderly shutdown: the status is "ended by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read()
    assert b"Serving" in log and b"Finished server process" in log
