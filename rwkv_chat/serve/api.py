"""The HTTP side: OpenAI-shaped endpoints over a Scheduler (Starlette; uvicorn runs it, server.py).

    POST /v1/chat/completions   messages -> the project's chat template (chat/template.py)
    POST /v1/completions        plain text (or token ids) continued
    GET  /v1/models             the model, and "model:state" for each tuned state file
    GET  /health                liveness and load (no API key needed)

Sampling maps onto SamplingSettings with OpenAI's meanings and defaults: temperature (1),
top_p (1), presence_penalty / frequency_penalty (0; counts of the generated tokens, no decay),
top_k (an extension, 0 = off), max_tokens (or max_completion_tokens), stop, seed. Anything that
would change the answer and is not implemented (n > 1, logprobs, tools, logit_bias, ...) is
refused with a 400 naming it, never ignored.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat.template import ASSISTANT, TURN_END, USER, clean_user_message, normalise_preamble, turn_prompt
from ..engine.state import RWKVState
from ..errors import SamplingError
from ..sampling import END_OF_TEXT, SamplingSettings
from .scheduler import Job, Overloaded, Scheduler


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 16384
    max_tokens: int = 4096  # the most one request may ask for
    default_max_tokens: int = 512  # when a request does not say


@dataclass
class Service:
    """What the endpoints serve: one model (by name), its tokenizer, the tuned states, the scheduler."""

    model_id: str
    scheduler: Scheduler
    tokenizer: object
    states: dict[str, RWKVState] = field(default_factory=dict)  # name -> starting state
    api_key: str | None = None
    limits: Limits = Limits()
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(status: int, message: str, param=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------ request checks
_UNSUPPORTED = {  # field -> values that are fine (what "not asked for" looks like)
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,),
}


def _check_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"n={n!r} is not supported: this server returns one choice per request (n=1)", "n")
    for name, fine in _UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            raise ApiError(400, f"{name} is not supported by this server (got {body[name]!r})", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "response_format other than {'type': 'text'} is not supported", "response_format")


def _number(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", name)
    return value


def sampling_settings(body: dict, limits: Limits, *, chat: bool) -> SamplingSettings:
    _check_unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{name} must be an integer >= 1, got {max_tokens!r}", name)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{name}={max_tokens} is above this server's limit of {limits.max_tokens}", name)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise ApiError(400, "stop must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
    values = {
        "temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
        "top_k": body.get("top_k") if body.get("top_k") is not None else 0,
        "presence": _number(body, "presence_penalty", 0.0), "frequency": _number(body, "frequency_penalty", 0.0),
    }
    api_names = {"presence": "presence_penalty", "frequency": "frequency_penalty"}
    for key, value in values.items():  # one at a time, so that the error names the request's parameter
        try:
            SamplingSettings(**{key: value})
        except SamplingError as error:
            name = api_names.get(key, key)
            raise ApiError(400, str(error).replace(key, name, 1), name) from None
    return SamplingSettings(
        **values, penalty_decay=1.0, max_tokens=max_tokens, seed=None if seed is None else seed % 2**64,
        token_ban=(END_OF_TEXT,) if chat else (), stop=tuple(([TURN_END] if chat else []) + stop))


def _encodable(text: str, where: str, param: str) -> str:
    """`text`, or a 400 naming `where` if it holds a lone surrogate (a JSON escape such as "\\ud800"
    without its pair): such text has no UTF-8 form, so the tokenizer cannot read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(400, f"{where} is not valid Unicode text: it holds a lone surrogate "
                       f"U+{ord(text[error.start]):04X} at character {error.start}", param) from None
    return text


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return _encodable(content, f"{where}.content", "messages")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(_encodable(part["text"], f"{where}.content[{j}].text", "messages"))
        return "\n".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", "messages")


def chat_prompt(messages, encode) -> list[int]:
    """Token ids of the conversation in the chat template, encoded a piece at a time (preamble,
    each "User: ...\\n\\nAssistant:", each " reply\\n\\n") so that the ids of a conversation are a
    prefix of the ids of its continuation (what the state cache needs)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    preamble, turns, pending_user = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", "messages")
        role = message.get("role")
        text = _text_content(message.get("content"), where)
        if role in ("system", "developer"):
            if turns or pending_user:
                raise ApiError(400, f"{where}: system messages are only accepted before the conversation", "messages")
            preamble.append(text)
        elif role == "user":
            pending_user.append(text)
        elif role == "assistant":
            if not pending_user:
                raise ApiError(400, f"{where}: an assistant message must follow a user message", "messages")
            turns.append(("\n".join(pending_user), text))
            pending_user = []
        else:
            raise ApiError(400, f"{where}: role must be system, user or assistant, got {role!r}", "messages")
    if not pending_user:
        raise ApiError(400, "the last message must be from the user", "messages")
    pieces = [normalise_preamble("\n".join(preamble))] if preamble else []
    try:
        for user, reply in turns:
            pieces.append(turn_prompt(clean_user_message(user), USER, ASSISTANT))
            reply = reply.replace("\r\n", "\n").strip()
            pieces.append(" " + (clean_user_message(reply) if reply else "") + TURN_END)
        pieces.append(turn_prompt(clean_user_message("\n".join(pending_user)), USER, ASSISTANT))
    except ValueError as error:
        raise ApiError(400, f"a user message is empty ({error})", "messages") from None
    return [token for piece in pieces if piece for token in encode(piece)]


def completion_prompt(prompt, encode, vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(_encodable(prompt, "prompt", "prompt"))
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab_size - 1}", "prompt")
        ids = list(prompt)
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a list holding one of those", "prompt")
    if not ids:
        raise ApiError(400, "prompt is empty", "prompt")
    return ids


# ------------------------------------------------------------------ the app
class _Relay:
    """Events from the scheduler thread to the jobs' queues on the event loop, with one wake-up of
    the loop per turn of the scheduler (its flush): a decode step emits a token to every job in the
    batch, and a wake-up per event made the scheduler hand the GIL over to the loop each time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: collections.deque = collections.deque()

    def emit(self, queue: asyncio.Queue, event) -> None:
        self._pending.append((queue, event))

    def flush(self) -> None:
        if self._pending:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

    def _deliver(self) -> None:  # on the loop: what was emitted up to now, in order
        while self._pending:
            queue, event = self._pending.popleft()
            queue.put_nowait(event)


def create_app(service: Service) -> Starlette:
    relay: _Relay | None = None
    async def read_body(request: Request) -> dict:
        check_key(request)
        limit = service.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over this server's limit of {limit} bytes")
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, f"request body is over this server's limit of {limit} bytes")
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the request") from None
        try:
            body = json.loads(data)
        except RecursionError:  # json.loads recurses once per level of [ and {
            raise ApiError(400, "the request body nests too deeply") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def check_key(request: Request) -> None:
        if service.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), service.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error")

    def start_state(body: dict) -> tuple[str, str, RWKVState | None]:
        """(model name to answer with, start name for the cache, starting state or None)."""
        model = body.get("model")
        state_name = body.get("state")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string", "model")
        if state_name is not None and not isinstance(state_name, str):
            raise ApiError(400, "state must be a string (the name of a tuned state file)", "state")
        if model and model != service.model_id:
            base, _, suffix = model.partition(":")
            if base != service.model_id or not suffix:
                raise ApiError(404, f"model {model!r} not found; this server has {', '.join(model_ids())}",
                               "model", kind="not_found_error")
            if state_name is not None and state_name != suffix:
                raise ApiError(400, f"model names state {suffix!r} but state is {state_name!r}", "state")
            state_name = suffix
        if not state_name:
            return service.model_id, "", None
        if state_name not in service.states:
            raise ApiError(404, f"state {state_name!r} not found; tuned states: "
                           f"{', '.join(service.states) or 'none (start the server with --state FILE)'}",
                           "state", kind="not_found_error")
        return f"{service.model_id}:{state_name}", state_name, service.states[state_name]

    def model_ids() -> list[str]:
        return [service.model_id] + [f"{service.model_id}:{name}" for name in service.states]

    def submit(prompt: list[int], settings: SamplingSettings, start: str, state: RWKVState | None, param: str):
        """`param`: the request field the prompt came from ("messages" or "prompt"), for errors."""
        if len(prompt) > service.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens, over this server's limit of "
                           f"{service.limits.max_prompt_tokens}", param)
        vocab = service.scheduler.model.vocab_size
        if max(prompt) >= vocab:
            raise ApiError(400, f"the prompt has token id {max(prompt)}, outside this model's vocabulary of {vocab}",
                           param)
        nonlocal relay
        loop = asyncio.get_running_loop()
        if relay is None or relay.loop is not loop:
            relay = _Relay(loop)
            service.scheduler.add_flush(relay.flush)
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(prompt=prompt, settings=settings, emit=functools.partial(relay.emit, queue), start=start,
                  start_state=state)
        try:
            service.scheduler.submit(job)
        except Overloaded as error:
            status = 503 if error.shutting_down else 429
            raise ApiError(status, str(error), kind="server_error" if status == 503 else "rate_limit_error",
                           headers={"Retry-After": str(error.retry_after)}) from None
        return job, queue

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
                "total_tokens": len(job.prompt) + len(job.tokens),
                "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

    async def completion(request: Request, chat: bool) -> Response:
        body = await read_body(request)
        model_name, start, state = start_state(body)
        settings = sampling_settings(body, service.limits, chat=chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        encode = service.tokenizer.encode
        if chat:
            prompt = chat_prompt(body.get("messages"), encode)
        else:
            prompt = completion_prompt(body.get("prompt"), encode, service.scheduler.model.vocab_size)
        job, queue = submit(prompt, settings, start, state, "messages" if chat else "prompt")
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish, first=False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if stream:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}

        def envelope(choices, **extra) -> dict:
            return {"id": ident, "object": kind + (".chunk" if chat and stream else ""), "created": created,
                    "model": model_name, "system_fingerprint": None, "choices": choices, **extra}

        leading = [chat]  # a chat reply starts after "Assistant:" with a space the client should not see

        def visible(piece: str) -> str:
            if leading[0]:
                piece = piece.lstrip(" ")
                leading[0] = not piece
            return piece

        if stream:
            async def events():
                try:
                    if chat:
                        yield _sse(envelope([choice(None, None, first=True)]))
                    while True:
                        event = await queue.get()
                        if event[0] == "text":
                            piece = visible(event[1])
                            if piece:
                                yield _sse(envelope([choice(piece, None)]))
                        elif event[0] == "done":
                            yield _sse(envelope([choice(None, _finish_reason(event[1]))]))
                            if include_usage:
                                yield _sse(envelope([], usage=usage(job)))
                            yield "data: [DONE]\n\n"
                            return
                        else:
                            yield _sse({"error": {"message": event[1], "type": "server_error", "param": None,
                                                  "code": None}})
                            return
                finally:
                    job.cancel()  # the client went away (or we are done: then nothing happens)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text, reason = await _collect(request, job, queue, visible)
        if reason == "error":
            raise ApiError(500, text, kind="server_error")
        return JSONResponse(envelope([choice(text, _finish_reason(reason))], usage=usage(job)))

    async def chat_completions(request: Request) -> Response:
        return await completion(request, chat=True)

    async def completions(request: Request) -> Response:
        return await completion(request, chat=False)

    async def models(request: Request) -> Response:
        check_key(request)
        data = [{"id": name, "object": "model", "created": service.created, "owned_by": "rwkv-chat"}
                for name in model_ids()]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        scheduler = service.scheduler
        ok = scheduler.error is None
        return JSONResponse({"status": "ok" if ok else "failed", "model": service.model_id, **scheduler.load},
                            status_code=200 if ok else 503)

    async def api_error(request: Request, error: ApiError) -> Response:
        return error_response(error.status, error.message, error.param, error.kind, error.headers)

    async def http_error(request: Request, error: HTTPException) -> Response:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                              kind=kind, headers=getattr(error, "headers", None))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _collect(request: Request, job: Job, queue: asyncio.Queue, visible) -> tuple[str, str]:
    """Wait for a non-streamed job; a client that disconnects meanwhile cancels it."""
    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    pieces = []
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, watch}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                job.cancel()
                raise ApiError(499, "client disconnected")
            event = getter.result()
            if event[0] == "text":
                pieces.append(visible(event[1]))
            elif event[0] == "done":
                return "".join(pieces), event[1]
            else:
                return event[1], "error"
    finally:
        watch.cancel()
        job.cancel()
