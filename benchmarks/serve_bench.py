"""`rwkv-chat serve` under load: aggregate decode speed and latency at 1-16 concurrent streams, and
time to first token on a cached conversation.

    python benchmarks/serve_bench.py [--shapes 0.1b,0.4b] [--strategy "cpu bf16i8"] [--streams 1,2,4,8,16]
                                     [--tokens 32] [--rounds 2] [--models-dir DIR]

For each shape it makes a random-weight RWKV-7 checkpoint (bf16, official layout; kept in
--models-dir), starts `rwkv-chat serve` on it in a child process (a free localhost port), and:

- for N concurrent streams: N clients (threads, streaming /v1/completions, greedy, distinct
  ~15-token prompts, --tokens tokens each) start together. Decode tok/s: the tokens streamed
  while all N were generating (from the last stream's first token to the first stream's last)
  per second; end to end tok/s: all generated tokens / the round's wall time (first request sent
  to last stream closed: the prompts' prefill and queueing included). Per stream
  the time to first token (TTFT) and the gaps between streamed chunks (inter-token time, ITT);
  p50/p95 over all streams of the best of --rounds rounds (the machine may be shared);
- a chat conversation of 10 turns (each user message ~12 tokens, replies of --tokens tokens):
  TTFT of turn 2 and turn 10 as sent (the server's state cache holds the history) and of the
  same turn-10 request with a one-word system message in front (nothing cached: the whole
  history is prefilled), plus the prompt and cached token counts the server reported.

Prints a Markdown section (paste it into docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024)}


def make_model(folder: Path, shape: str) -> Path:
    layers, embd = SHAPES[shape]
    path = folder / f"v7-{shape}.pth"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "rwkv_chat.testing.checkpoints", "--version", "7", "--layers",
                        str(layers), "--embd", str(embd), str(path)], check=True, cwd=ROOT)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, strategy: str, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, RWKV_CHAT_HOME=tempfile.mkdtemp(), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rwkv_chat.cli", "serve", "-m", str(model), "-s", strategy, "--port", str(self.port),
             "--max-batch", str(max_batch)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def stream_once(url: str, path: str, body: dict) -> dict:
    """One streamed request -> {ttft, gaps, tokens, cached}."""
    sent = time.perf_counter()
    times, usage, pieces = [], {}, []
    with httpx.Client(timeout=600) as http, http.stream("POST", url + path, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices", []):
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if text:
                    times.append(time.perf_counter())
                    pieces.append(text)
    return {"ttft": times[0] - sent if times else None, "times": times, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": usage.get("completion_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "prompt": usage.get("prompt_tokens", 0), "end": time.perf_counter(), "text": "".join(pieces)}


def concurrent_round(url: str, streams: int, tokens: int, round_no: int) -> dict:
    results: list[dict] = [None] * streams
    barrier = threading.Barrier(streams)

    def client(i: int) -> None:
        body = {"prompt": f"Round {round_no}, stream {i}: once upon a time there was",
                "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        barrier.wait()
        results[i] = stream_once(url, "/v1/completions", body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    generated = sum(r["tokens"] for r in results)
    return {"streams": streams, "tok_s": generated / wall, "generated": generated, "decode": steady_rate(results),
            "ttft": [r["ttft"] for r in results if r["ttft"] is not None],
            "itt": [g for r in results for g in r["gaps"]]}


def steady_rate(results: list[dict]) -> float:
    """Aggregate decode tok/s while all streams were generating: from the last stream's first
    token to the first stream's last token (chunks scaled to tokens per stream)."""
    start = max(r["times"][0] for r in results)
    end = min(r["times"][-1] for r in results)
    if end - start < 0.2:
        return float("nan")
    tokens = sum(sum(start <= t <= end for t in r["times"]) * r["tokens"] / len(r["times"]) for r in results)
    return tokens / (end - start)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def conversation(url: str, tokens: int) -> dict:
    messages, out = [], {}
    for turn in range(1, 11):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me one more thing about the river, please."})
        body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        result = stream_once(url, "/v1/chat/completions", body)
        messages.append({"role": "assistant", "content": result["text"]})
        if turn in (2, 10):
            out[turn] = result
    cold_body = {"messages": [{"role": "system", "content": "Cold."}] + messages[:-1], "max_tokens": tokens,
                 "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out["cold"] = stream_once(url, "/v1/chat/completions", cold_body)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0.1b,0.4b")
    parser.add_argument("--strategy", default="cpu bf16i8")
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-conversation", action="store_true", help="Skip the cached-conversation part.")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "rwkv-chat-bench-models")
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]
    lines = [f"## rwkv-chat serve ({args.strategy}, RWKV-7, {args.tokens} tokens per stream, "
             f"best of {args.rounds} rounds)", ""]
    for shape in args.shapes.split(","):
        model = make_model(args.models_dir, shape)
        server = Server(model, args.strategy, max_batch=max(levels))
        try:
            stream_once(server.url, "/v1/completions", {"prompt": "warm up", "max_tokens": 4, "stream": True})
            best = {}
            for round_no in range(args.rounds):
                for n in levels:  # interleaved: every level once per round
                    result = concurrent_round(server.url, n, args.tokens, round_no)
                    print(f"{shape} {n} streams round {round_no}: {result['tok_s']:.1f} tok/s end to end, "
                          f"{result['decode']:.1f} decoding", file=sys.stderr)
                    if n not in best or result["decode"] > best[n]["decode"]:
                        best[n] = result
            chat = None if args.no_conversation else conversation(server.url, args.tokens)
        finally:
            server.stop()
        layers, embd = SHAPES[shape]
        single = best[levels[0]]["decode"]
        lines += [f"### {shape} ({layers} layers x {embd})", "",
                  "| streams | decode tok/s (all streaming) | x 1 stream | end to end tok/s | TTFT p50 / p95 (s) "
                  "| inter-token p50 / p95 (ms) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for n in levels:
            r = best[n]
            lines.append(f"| {n} | {r['decode']:.1f} | {r['decode'] / single:.2f} | {r['tok_s']:.1f} | "
                         f"{percentile(r['ttft'], .5):.2f} / "
                         f"{percentile(r['ttft'], .95):.2f} | {1000 * percentile(r['itt'], .5):.0f} / "
                         f"{1000 * percentile(r['itt'], .95):.0f} |")
        if chat is not None:
            lines += ["", "| conversation | prompt tokens | cached | TTFT (s) |", "|---|---:|---:|---:|"]
            for name, key in (("turn 2", 2), ("turn 10", 10), ("turn 10, nothing cached", "cold")):
                r = chat[key]
                lines.append(f"| {name} | {r['prompt']} | {r['cached']} | {r['ttft']:.2f} |")
        lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
