"""Smoke test of an install without the test extras (CI runs it in a fresh venv).

Chats with the bundled demo model, checks the conversation was stored and reopens it exactly,
exports a snapshot (Ctrl+S) and opens it, drives the TUI for one message and Ctrl+S, and runs
the `rwkv-chat` command (history, info, and `serve` answering one chat request). Everything is written under a temporary folder.

    python scripts/smoke.py
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}")


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="rwkv-chat-smoke-"))
    os.environ["RWKV_CHAT_HOME"] = str(home)
    os.environ["XDG_CACHE_HOME"] = str(home / "cache")  # the expanded demo model
    started = time.perf_counter()

    from rwkv_chat import RWKV, Pipeline
    from rwkv_chat.chat.session import ChatSession
    from rwkv_chat.chat.store import ConversationStore
    from rwkv_chat.sampling import SamplingSettings
    from rwkv_chat.demo import demo_model_path

    model = RWKV(demo_model_path(), "cpu fp32", progress=None)
    pipeline = Pipeline(model)
    session = ChatSession(pipeline, SamplingSettings(max_tokens=20, seed=1))
    session.attach_store(ConversationStore())
    reply = "".join(session.send("Hello! How are you?"))
    check(bool(reply.strip()), f"the demo model replies ({reply.strip()[:40]!r})")
    check(session.wait_stored(60) and session.store_error is None, "the conversation is stored")

    session.close()  # as the app does on quit; a conversation still open elsewhere would reopen as a copy
    store = ConversationStore()
    (info,) = store.list()
    check(info.title == "Hello! How are you?" and info.n_messages == 2, "a second store lists it")
    reopened = ChatSession.from_store(pipeline, store, info.id)
    check(reopened.messages == session.messages, "it reopens with the same messages")
    for s in (session, reopened):
        list(s.send("Tell me more."))
    check(reopened.messages[-1].text == session.messages[-1].text, "the reopened state continues exactly")

    path = session.save()
    opened = ChatSession.open(pipeline, path)
    check(opened.messages == session.messages, f"a snapshot saves and opens ({path.name})")
    session.close()
    reopened.close()

    from rwkv_chat.tui.app import make_app

    tui_session = ChatSession(pipeline, SamplingSettings(max_tokens=8, seed=1))
    tui_session.attach_store(store)

    async def drive() -> None:
        app = make_app(tui_session)
        async with app.run_test(size=(100, 30)) as pilot:
            app.screen.prompt.text = "Hi there"
            await pilot.press("enter")
            deadline = time.monotonic() + 60
            while (len(tui_session.messages) < 2 or tui_session.busy) and time.monotonic() < deadline:
                await pilot.pause(0.05)
            await pilot.press("ctrl+s")
            while len(list((home / "snapshots").glob("*.rwkvchat"))) < 2 and time.monotonic() < deadline:
                await pilot.pause(0.05)
            await pilot.press("ctrl+q")

    asyncio.run(drive())
    check(len(list((home / "snapshots").glob("*.rwkvchat"))) == 2, "the TUI sends a message and Ctrl+S saves")

    command = [sys.executable, "-m", "rwkv_chat.cli"]
    listed = subprocess.run([*command, "history", "--json"], capture_output=True, text=True, check=True).stdout
    titles = sorted(json.loads(line)["title"] for line in listed.splitlines())
    check(titles == ["Hello! How are you?", "Hi there"], "rwkv-chat history lists both conversations")
    described = subprocess.run([*command, "info", str(path)], capture_output=True, text=True, check=True).stdout
    check("saved conversation" in described, "rwkv-chat info reads the snapshot")
    check_serve(command)
    print(f"smoke: all passed in {time.perf_counter() - started:.1f}s")


def check_serve(command: list[str]) -> None:
    """`rwkv-chat serve` on the demo model answers a chat completion (stdlib HTTP only), then a
    SIGTERM stops it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*command, "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"smoke: FAILED: rwkv-chat serve exited: {server.stderr.read().decode()[-800:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("smoke: FAILED: rwkv-chat serve did not start in 120 s") from None
                time.sleep(0.2)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
            model = json.load(response)["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        check(answer["choices"][0]["message"]["content"].strip() != "", "rwkv-chat serve answers a chat request")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
