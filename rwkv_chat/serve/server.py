"""Running the server: the scheduler thread plus uvicorn, with a clean SIGTERM.

On SIGTERM (or Ctrl+C) the scheduler takes no new requests (503), lets running ones finish for
`grace` seconds, then ends the rest with finish_reason "length"; every open stream closes with
its final chunk and `data: [DONE]`, and uvicorn exits once the connections are closed.
"""
from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

from ..errors import RWKVChatError
from .api import Limits, Service, create_app
from .cache import StateCache
from .scheduler import Scheduler


class StateNameError(RWKVChatError, ValueError):
    """Two --state files would be served under one name."""


class ServeOptionError(RWKVChatError, ValueError):
    """An API key or host the server cannot work with."""


class ListenError(RWKVChatError, OSError):
    """The server's address cannot be listened on (a port in use, an address not of this machine, ...)."""


def check_api_key(api_key: str) -> None:
    """ServeOptionError for a key that would let everyone in (empty) or that no client could send:
    HTTP header values are ASCII, and their surrounding spaces are dropped."""
    if not api_key:
        raise ServeOptionError("the API key is empty, which would let every client in; give a key, "
                               "or leave it out to serve without one")
    for position, character in enumerate(api_key):
        if not " " <= character <= "~":
            raise ServeOptionError(f"the API key must be printable ASCII ({character!r} at character {position}): "
                                   "HTTP clients could not send it")
    if api_key != api_key.strip(" "):
        raise ServeOptionError("the API key starts or ends with a space, which HTTP drops: clients could not send it")


def check_host(host: str) -> None:
    if not host.strip():
        raise ServeOptionError("the host is empty; give the address to listen on: 127.0.0.1 for this machine "
                               "only, 0.0.0.0 for every interface")


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on every address of `host` (port 0: a free one, the same on all of them).
    Holding them from before the model loads until uvicorn serves on them means nothing else can
    take the port in between. ListenError, with what to do, when the address cannot be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ListenError(f"cannot listen on {host!r}: {error.strerror}; check --host") from None
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            if sockets:  # the port the first one got (--port 0)
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ListenError(_listen_failure(host, port, error)) from None
    return sockets


def _listen_failure(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use; pick another with --port"
    if error.errno == errno.EACCES:
        return f"port {port} on {host} is not allowed to this user (ports below 1024 usually need root); " \
               "pick another with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; pick another with --host"
    return f"cannot listen on {host} port {port}: {error.strerror or error}"


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def build_service(model, tokenizer, *, model_id: str, state_paths=(), api_key: str | None = None,
                  limits: Limits = Limits(), max_batch: int = 16, max_queue: int = 64,
                  cache_bytes: int = 512 << 20, prefill_chunk: int = 128,
                  timeout: float = 600.0) -> Service:
    if api_key is not None:
        check_api_key(api_key)
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
                   api_key=api_key, limits=limits)


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

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until a signal; on `sockets` (from listen()) if given, else on the configured host and port."""
        self.service.scheduler.start()
        self.server.run(sockets=sockets)

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
