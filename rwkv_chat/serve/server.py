"""Running the server: the scheduler thread plus uvicorn, with a clean SIGTERM.

On SIGTERM (or Ctrl+C) the scheduler takes no new requests (503), lets running ones finish for
`grace` seconds, then ends the rest with finish_reason "length"; every open stream closes with
its final chunk and `data: [DONE]`, and uvicorn exits once the connections are closed.
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..errors import RWKVChatError
from .api import Limits, Service, create_app
from .cache import StateCache
from .scheduler import Scheduler


class StateNameError(RWKVChatError, ValueError):
    """Two --state files would be served under one name."""


def build_service(model, tokenizer, *, model_id: str, state_paths=(), api_key: str | None = None,
                  limits: Limits = Limits(), max_batch: int = 16, max_queue: int = 64,
                  cache_bytes: int = 512 << 20, prefill_chunk: int = 128,
                  timeout: float = 600.0) -> Service:
    states = {}
    for path in state_paths:
        name = Path(path).stem
        if name in states:
            raise StateNameError(f"two state files named {name!r} ({path}); clients choose states by name: "
                                 "rename one")
        states[name] = model.load_state(path)  # ModelLoadError / StateMismatchError name the file
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                          prefill_chunk=prefill_chunk, cache=StateCache(cache_bytes), timeout=timeout)
    return Service(model_id=model_id, scheduler=scheduler, tokenizer=tokenizer, states=states,
                   api_key=api_key or None, limits=limits)


class HttpServer:
    """uvicorn.Server whose exit signal first drains the scheduler."""

    def __init__(self, service: Service, host: str, port: int, grace: float, log_level: str = "info"):
        import uvicorn

        self.service = service
        self.grace = grace
        config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=grace + 10, lifespan="off")
        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                outer.service.scheduler.shutdown(outer.grace)
                super().handle_exit(sig, frame)

        self.server = Server(config)

    def run(self) -> None:
        self.service.scheduler.start()
        self.server.run()

    def start_in_thread(self) -> threading.Thread:
        """Serve from a background thread (tests, benchmarks); `stop()` ends it."""
        self.service.scheduler.start()
        thread = threading.Thread(target=self.server.run, name="rwkv-serve-http", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.service.scheduler.shutdown(self.grace)
        self.server.should_exit = True

    @property
    def started(self) -> bool:
        return self.server.started
