"""The OpenAI-compatible server through the official `openai` client and raw HTTP (httpx)."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from rwkv_chat.serve.api import Limits, chat_prompt

N = 12  # tokens per test reply


def greedy_reference(model, tokenizer, ids, n, *, chat):
    """A plain loop: argmax (EOS banned in chat, else it ends the reply), n tokens, text cut at the stop."""
    logits, state = model.forward(ids)
    out = []
    for _ in range(n):
        scores = logits.clone()
        if chat:
            scores[0] = float("-inf")
        token = int(scores.argmax())
        if token == 0:
            break
        out.append(token)
        logits, state = model.forward([token], state)
    text = tokenizer.decode(out)
    if chat:
        text = text.split("\n\n")[0].lstrip(" ")
    return text


def user(text):
    return [{"role": "user", "content": text}]


def test_chat_non_streaming_and_streaming_give_the_greedy_reply(client, serve_model, tokenizer):
    want = greedy_reference(serve_model, tokenizer, chat_prompt(user("Hello there"), tokenizer.encode), N, chat=True)
    reply = client.chat.completions.create(model="tiny", messages=user("Hello there"), temperature=0, max_tokens=N)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(chat_prompt(user("Hello there"), tokenizer.encode))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == N else "stop")

    chunks = list(client.chat.completions.create(model="tiny", messages=user("Hello there"), temperature=0,
                                                 max_tokens=N, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_and_models(client, serve_model, tokenizer):
    want = greedy_reference(serve_model, tokenizer, tokenizer.encode("Once upon a time"), N, chat=False)
    got = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=N)
    assert got.choices[0].text == want
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=N,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and len(ids) == 2 and ids[1].startswith("tiny:")


def test_a_tuned_state_is_chosen_by_model_name_or_state_field(client, server):
    state_model = [m.id for m in client.models.list().data][1]
    state_name = state_model.split(":", 1)[1]
    by_name = client.chat.completions.create(model=state_model, messages=user("Hi"), temperature=0, max_tokens=N)
    by_field = client.chat.completions.create(model="tiny", messages=user("Hi"), temperature=0, max_tokens=N,
                                              extra_body={"state": state_name})
    plain = client.chat.completions.create(model="tiny", messages=user("Hi"), temperature=0, max_tokens=N)
    assert by_name.choices[0].message.content == by_field.choices[0].message.content
    assert by_name.model == state_model
    assert by_name.choices[0].message.content != plain.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="tiny:nope", messages=user("Hi"), max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=user("Hi"), max_tokens=2)


def test_same_seed_same_sampled_text_even_among_other_requests(client):
    def ask(seed):
        return client.completions.create(model="tiny", prompt="The sea", temperature=1.0, top_p=0.9, seed=seed,
                                         max_tokens=N).choices[0].text

    alone = ask(7)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, [7, 8, 7, 9, 7, 10]))
    assert results[0] == results[2] == results[4] == alone
    assert len({alone, results[1], results[3], results[5]}) > 1


def test_32_concurrent_clients_each_get_their_single_request_result(server, serve_model, tokenizer):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompts = [f"Story number {i}:" for i in range(32)]

    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=N).choices[0].text

    steps = server.scheduler.stats["decode_steps"]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, prompts))
    batched_steps = server.scheduler.stats["decode_steps"] - steps
    assert batched_steps < 32 * N / 2  # they really decoded together (8 at a time: about 4 * N steps)
    for prompt, text in zip(prompts, together):
        assert text == greedy_reference(serve_model, tokenizer, tokenizer.encode(prompt), N, chat=False), prompt


def test_second_chat_turn_prefills_only_the_new_tokens(client, server, tokenizer):
    first = user("Tell me about cats")
    reply = client.chat.completions.create(model="tiny", messages=first, temperature=0, max_tokens=N)
    turn2 = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And dogs?"}]
    before = server.scheduler.stats["prefilled_tokens"]
    cached = client.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=N)
    prefilled = server.scheduler.stats["prefilled_tokens"] - before
    first_ids = chat_prompt(first, tokenizer.encode)
    all_ids = chat_prompt(turn2, tokenizer.encode)
    assert cached.usage.prompt_tokens == len(all_ids)
    assert cached.usage.prompt_tokens_details.cached_tokens >= len(first_ids)
    assert prefilled == len(all_ids) - cached.usage.prompt_tokens_details.cached_tokens
    assert prefilled <= len(all_ids) - len(first_ids)

    server.scheduler.cache.clear()
    uncached = client.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=N)
    assert uncached.usage.prompt_tokens_details.cached_tokens == 0
    assert uncached.choices[0].message.content == cached.choices[0].message.content


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompt": "x", "n": 3}), "n=3 is not supported"),
    (json.dumps({"prompt": "x", "temperature": "hot"}), "temperature must be a number"),
    (json.dumps({"prompt": "x", "top_p": 0}), "top_p must be"),
    (json.dumps({"prompt": "x", "max_tokens": 10**6}), "above this server's limit"),
    (json.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens must be an integer >= 1"),
    (json.dumps({"prompt": "x", "logprobs": 2}), "logprobs is not supported"),
    (json.dumps({"prompt": "x", "stop": [1]}), "stop must be"),
    (json.dumps({"prompt": ""}), "prompt is empty"),
    (json.dumps({"prompt": [70000]}), "token ids must be in"),
    (json.dumps({"prompt": "x", "presence_penalty": 9}), "presence_penalty must be"),
])
def test_bad_requests_get_a_400_naming_the_problem(server, body, needle):
    response = httpx.post(server.url + "/v1/completions", content=body, timeout=10)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_bad_chat_messages_get_a_400(server):
    for messages, needle in [([], "non-empty list"), ([{"role": "assistant", "content": "x"}], "must follow"),
                             ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
                             ([{"role": "tool", "content": "a"}], "role must be"),
                             ([{"role": "user", "content": [{"type": "image_url"}]}], "only text")]:
        response = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=10)
        assert response.status_code == 400 and needle in response.json()["error"]["message"], (messages, response.text)


@pytest.mark.parametrize("body", [b"[" * 30000 + b"]" * 30000, b'{"a":' * 10000 + b"1" + b"}" * 10000],
                         ids=["lists", "objects"])  # both under the test server's 64 KiB limit
def test_too_deeply_nested_a_body_is_a_400(server, body):
    response = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": "the request body nests too deeply",
                                        "type": "invalid_request_error", "param": None, "code": None}


LONE = "\ud800"  # half a surrogate pair: it has no UTF-8 form, so it cannot be tokenized


@pytest.mark.parametrize("path, body, where", [
    ("/v1/chat/completions", {"messages": user(LONE)}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "\udfff"}] + user("Hi")},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": user("Hi") + [{"role": "assistant", "content": "a" + LONE}] + user("Hi")},
     "messages[1].content"),
    ("/v1/chat/completions", {"messages": user([{"type": "text", "text": "Hi"}, {"type": "text", "text": LONE}])},
     "messages[0].content[1].text"),
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": [LONE]}, "prompt"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, where, stream):
    content = json.dumps({**body, "max_tokens": 3, "stream": stream})  # ASCII, the surrogate as a \u escape
    response = httpx.post(server.url + path, content=content, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(f"{where} is not valid Unicode text"), error
    assert error["param"] == ("prompt" if path == "/v1/completions" else "messages")
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_too_long_a_prompt_names_the_field_it_came_from(client):
    with pytest.raises(openai.BadRequestError, match="over this server's limit") as completion:
        client.completions.create(model="tiny", prompt="hi " * 20000, max_tokens=2)
    assert completion.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match="over this server's limit") as chat:
        client.chat.completions.create(model="tiny", messages=user("hi " * 20000), max_tokens=2)
    assert chat.value.param == "messages"


def test_too_large_a_body_is_413_and_unknown_paths_404(server):
    response = httpx.post(server.url + "/v1/completions", content=b"x" * (65 << 10), timeout=10)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    response = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_api_key(start_server):
    running = start_server(api_key="sekrit", max_batch=2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        response = httpx.get(running.url + "/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    good = openai.OpenAI(base_url=running.url + "/v1", api_key="sekrit", max_retries=0)
    assert good.models.list().data[0].id == "tiny"
    assert httpx.get(running.url + "/health", timeout=10).status_code == 200  # no key needed


def _open_stream(url, max_tokens=60):
    """A streaming request held open; returns (client, response, line iterator)."""
    http = httpx.Client(timeout=30)
    request = http.build_request("POST", url + "/v1/completions",
                                 json={"prompt": "Go on", "max_tokens": max_tokens, "stream": True})
    response = http.send(request, stream=True)
    return http, response, response.iter_lines()


def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_slot(start_server):
    running = start_server(max_batch=1, max_queue=0)
    http, response, lines = _open_stream(running.url)
    assert response.status_code == 200
    next(line for line in lines if line.startswith("data:"))  # generating now
    response.close()
    http.close()
    _wait_for(lambda: running.scheduler.load["running"] == 0)
    after = httpx.post(running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert after.status_code == 200
    assert running.scheduler.stats["decoded_tokens"] < 60  # the first one stopped early


def test_queue_overflow_is_429_with_retry_after(start_server):
    # the first stream asks for enough tokens to hold the only slot throughout
    running = start_server(max_batch=1, max_queue=1, limits=Limits(max_tokens=4096, max_body_bytes=64 << 10))
    first = _open_stream(running.url, max_tokens=4096)
    next(line for line in first[2] if line.startswith("data:"))
    second = _open_stream(running.url)
    _wait_for(lambda: running.scheduler.load["waiting"] == 1)
    third = httpx.post(running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    assert "busy" in third.json()["error"]["message"]
    for http, response, _ in (first, second):
        response.close()
        http.close()


def test_shutdown_ends_open_streams_cleanly(start_server):
    running = start_server(max_batch=2)
    http, response, lines = _open_stream(running.url, max_tokens=64)
    next(line for line in lines if line.startswith("data:"))
    threading.Timer(0.1, running.server.stop).start()
    rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    final = json.loads(next(line for line in reversed(rest) if line.startswith("data: {"))[6:])
    assert final["choices"][0]["finish_reason"] in ("length", "stop")
    http.close()
    assert running.scheduler.join(5)


def test_a_request_past_the_timeout_ends_with_length(start_server):
    running = start_server(max_batch=2, timeout=1e-4)
    reply = httpx.post(running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 50}, timeout=10).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 0
