"""A real server on a free localhost port, inside the test process (uvicorn in a thread)."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import pytest

from rwkv_chat.serve.api import Limits
from rwkv_chat.serve.server import HttpServer, build_service


@dataclass
class Running:
    url: str
    server: HttpServer

    @property
    def service(self):
        return self.server.service

    @property
    def scheduler(self):
        return self.server.service.scheduler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_model(load_model):
    return load_model("7")


@pytest.fixture(scope="session")
def start_server(serve_model, tokenizer, make_state_path):
    """start_server(**build_service options) -> Running; every server is stopped at the end."""
    started = []

    def start(**options) -> Running:
        options.setdefault("limits", Limits(max_tokens=64, default_max_tokens=16, max_body_bytes=64 << 10))
        options.setdefault("state_paths", [make_state_path("7", n_layer=2, n_embd=64)])
        service = build_service(serve_model, tokenizer, model_id="tiny", **options)
        server = HttpServer(service, "127.0.0.1", free_port(), grace=2.0, log_level="warning")
        server.start_in_thread()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = server.server.config.port
        running = Running(f"http://127.0.0.1:{port}", server)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.stop()
        running.service.scheduler.join(5)


@pytest.fixture(scope="session")
def server(start_server) -> Running:
    """The shared server: batches of up to 8, a queue of 64."""
    return start_server(max_batch=8, max_queue=64)


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
