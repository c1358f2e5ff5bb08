"""The state cache and the scheduler without HTTP."""
from __future__ import annotations

import threading

import pytest
import torch

from rwkv_chat.engine.state import ModelShape, RWKVState
from rwkv_chat.sampling import SamplingSettings
from rwkv_chat.serve.cache import StateCache, state_bytes
from rwkv_chat.serve.scheduler import Job, Scheduler
from rwkv_chat.serve.server import build_service

SHAPE = ModelShape("7", 1, 4, 1, 4, 8)


def fake_state(mark: float) -> RWKVState:
    layers = [[torch.full((4,), mark), torch.zeros(1, 4, 4), torch.zeros(4)]]
    return RWKVState(SHAPE, layers, torch.zeros(8), 0)


def test_cache_finds_the_longest_cached_prefix_per_start():
    size = state_bytes(fake_state(0))
    cache = StateCache(10 * size)
    cache.put("", [1, 2], fake_state(1))
    cache.put("", [1, 2, 3, 4], fake_state(2))
    cache.put("poet", [1, 2, 3, 4, 5], fake_state(3))
    n, state = cache.longest_prefix("", [1, 2, 3, 4, 5, 6])
    assert n == 4 and state.layers[0][0][0] == 2
    assert cache.longest_prefix("", [1, 2, 9])[0] == 2
    assert cache.longest_prefix("", [7, 1, 2]) == (0, None)
    assert cache.longest_prefix("poet", [1, 2, 3, 4, 5])[0] == 5
    assert cache.longest_prefix("other", [1, 2, 3]) == (0, None)


def test_cache_drops_the_least_recently_used_past_its_byte_limit():
    size = state_bytes(fake_state(0))
    cache = StateCache(2 * size)
    cache.put("", [1], fake_state(1))
    cache.put("", [2], fake_state(2))
    cache.longest_prefix("", [1, 5])  # [1] is now the most recently used
    cache.put("", [3], fake_state(3))
    assert len(cache) == 2 and cache.bytes == 2 * size
    assert cache.longest_prefix("", [2])[1] is None
    assert cache.longest_prefix("", [1])[0] == 1 and cache.longest_prefix("", [3])[0] == 1
    StateCache(size - 1).put("", [1], fake_state(1))  # larger than the whole cache: not kept, no error


def test_a_long_prompt_is_prefilled_in_chunks_while_another_request_decodes(load_model, tokenizer):
    model = load_model("7")
    scheduler = Scheduler(model, tokenizer, max_batch=4, prefill_chunk=8)
    events, lock = [], threading.Lock()
    done = {name: threading.Event() for name in ("short", "long")}

    def emitter(name):
        def emit(event):
            with lock:
                events.append((name, event[0], scheduler.stats["prefilled_tokens"]))
            if event[0] == "done":
                done[name].set()
        return emit

    greedy = SamplingSettings(temperature=0, max_tokens=40, token_ban=())
    scheduler.submit(Job(prompt=[5, 6, 7], settings=greedy, emit=emitter("short")))
    scheduler.submit(Job(prompt=list(range(100, 300)), settings=greedy.replace(max_tokens=2), emit=emitter("long")))
    scheduler.start()
    assert done["short"].wait(60) and done["long"].wait(60)
    scheduler.shutdown(0)
    assert scheduler.join(10)
    # while the 200-token prompt was read 8 tokens at a time, the short request kept streaming
    during = [p for name, kind, p in events if name == "short" and kind == "text" and 3 < p < 203]
    assert len(during) >= 5
    assert scheduler.stats["prefilled_tokens"] == 203


def test_two_state_files_with_one_name_are_refused(load_model, tokenizer, make_state_path, tmp_path):
    source = make_state_path("7", n_layer=2, n_embd=64)
    other = tmp_path / "x" / source.name
    other.parent.mkdir()
    other.write_bytes(source.read_bytes())
    with pytest.raises(ValueError, match="two state files named"):
        build_service(load_model("7"), tokenizer, model_id="m", state_paths=[source, other])
