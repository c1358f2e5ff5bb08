"""Continuous batching on one thread: requests join and leave one decode batch between steps.

Each turn of the loop: admit waiting jobs (up to `max_batch` running), give one prefill chunk to
the oldest job still reading its prompt (chunked, so a long prompt never stalls the others for
more than a chunk), then one decode step for every job that is generating: each job samples its
next token from its own logits with its own seeded Sampler, and all the chosen tokens go through
`model.forward_batch` together (the weights are read once for the whole batch).

Per token a job does what `pipeline.Generation` does (sample, feed, record the penalty, decode
text, look for stop strings), so a greedy request gives the same text alone or in a batch, up to
the rounding of the batched GEMM (engine/batch.py). Events go to the job's `emit` callback, which
must not block: ("text", piece) and finally ("done", finish_reason). After each turn of the loop
the callbacks given to `add_flush` run, so that a listener may deliver a turn's events together.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.state import RWKVState
from ..errors import RWKVChatError
from ..sampling import Sampler, SamplingSettings, penalty_weight
from ..pipeline import StopStringFilter
from ..tokenizer import StreamDecoder
from .cache import StateCache

Emit = Callable[[tuple], None]


class Overloaded(RWKVChatError):
    """The queue is full (`retry_after` seconds is a fair wait) or the server is shutting down."""

    def __init__(self, message: str, retry_after: int, shutting_down: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.shutting_down = shutting_down


@dataclass
class Job:
    prompt: list[int]
    settings: SamplingSettings
    emit: Emit
    start: str = ""  # name of the starting state ("" = the model's initial state); part of cache keys
    start_state: RWKVState | None = None
    # filled in by the scheduler
    state: RWKVState | None = None
    fed: int = 0  # prompt tokens already in `state`
    cached_tokens: int = 0  # prompt tokens that came from the state cache
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Thread-safe: the job ends (finish_reason "cancelled") before its next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Running:
    """A job's generation-side objects (made when it is admitted)."""

    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.sampler = Sampler(job.settings.seed)
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopStringFilter()


class Scheduler:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 128,
                 cache: StateCache | None = None, timeout: float = 600.0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.timeout = timeout  # seconds from submission; a job still running then ends with "length"
        self.cache = cache if cache is not None else StateCache(512 << 20)
        self.stats = collections.Counter()  # prefilled_tokens, cached_tokens, decode_steps, decoded_tokens, jobs
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._accepting = True
        self._deadline: float | None = None  # shutting down: jobs still running then end with "length"
        self._thread = threading.Thread(target=self._loop, name="rwkv-serve-scheduler", daemon=True)
        self._stopped = threading.Event()
        self._flushes: list[Callable[[], None]] = []
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ outside the thread
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._wake:
            if not self._accepting:
                raise Overloaded("the server is shutting down", retry_after=10, shutting_down=True)
            free_slots = max(0, self.max_batch - len(self._running))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise Overloaded(f"the server is busy ({len(self._running)} requests running, {len(self._waiting)} "
                                 "waiting); try again shortly", retry_after=self._retry_after())
            self._waiting.append(job)
            self._wake.notify()
        return job

    def add_flush(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the scheduler thread after every turn of its loop (its events emitted)."""
        self._flushes.append(callback)

    def _flush(self) -> None:
        for callback in list(self._flushes):
            callback()

    def _retry_after(self) -> int:
        return max(1, min(60, len(self._waiting) // max(1, self.max_batch) + 1))

    @property
    def load(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue}

    def shutdown(self, grace: float = 5.0) -> None:
        """Take no more jobs; jobs still running after `grace` seconds end with finish_reason
        "length" (their streams then close normally). Returns at once; see `join`."""
        with self._wake:
            self._accepting = False
            self._deadline = time.monotonic() + grace
            self._wake.notify()

    def join(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._waiting or self._running or self._deadline is not None):
                        self._wake.wait()
                    while self._waiting and len(self._running) < self.max_batch:
                        self._running.append(self._admit(self._waiting.popleft()))
                    if self._deadline is not None and not self._running and not self._waiting:
                        return
                    cut = self._deadline is not None and time.monotonic() >= self._deadline
                if cut:
                    for run in self._running:
                        self._finish(run, "length")
                self._drop_finished()
                self._prefill_one_chunk()
                self._decode_step()
                self._drop_finished()
                self._flush()
        except BaseException as error:  # a broken model: tell every waiting client, then stop
            self.error = error
            with self._wake:
                self._accepting = False
                jobs = [run.job for run in self._running] + list(self._waiting)
                self._running, self._waiting = [], collections.deque()
            for job in jobs:
                if job.finish_reason is None:
                    job.finish_reason = "error"
                    job.emit(("error", f"generation failed: {error}"))
            self._flush()
            raise
        finally:
            self._stopped.set()

    def _admit(self, job: Job) -> _Running:
        self.stats["jobs"] += 1
        n, state = self.cache.longest_prefix(job.start, job.prompt)
        if state is None:
            state = job.start_state
        job.state, job.fed, job.cached_tokens = state, n, n
        self.stats["cached_tokens"] += n
        return _Running(job, self.tokenizer)

    def _prefill_one_chunk(self) -> None:
        for run in self._running:
            job = run.job
            if job.finish_reason is None and job.fed < len(job.prompt):
                if job.cancelled:
                    self._finish(run, "cancelled")
                    return
                decoding = any(r.job.fed == len(r.job.prompt) for r in self._running)
                size = self.prefill_chunk if decoding else 4 * self.prefill_chunk
                chunk = job.prompt[job.fed:job.fed + size]
                _, job.state = self.model.forward(chunk, job.state)
                job.fed += len(chunk)
                self.stats["prefilled_tokens"] += len(chunk)
                if job.fed == len(job.prompt):
                    self.cache.put(job.start, job.prompt, job.state)
                return

    def _decode_step(self) -> None:
        # the decode thread settings (torch on one thread, the kernels' helpers spinning) held across
        # the whole step, sampling included, as the chat pipeline holds them (RWKV.decoding)
        with self.model.decoding():
            self._decode_batch()

    def _decode_batch(self) -> None:
        batch: list[tuple[_Running, int]] = []
        eos = self.tokenizer.eos_id
        now = time.perf_counter()
        for run in self._running:
            job = run.job
            if job.finish_reason is not None or job.fed < len(job.prompt):
                continue
            if job.cancelled:
                self._finish(run, "cancelled")
            elif len(job.tokens) >= job.settings.max_tokens or now - job.submitted_at > self.timeout:
                self._finish(run, "length")
            else:
                token = run.sampler.sample(job.state.logits, job.settings)
                if token == eos:
                    self._finish(run, "stop")
                else:
                    batch.append((run, token))
        if not batch:
            return
        _, states = self.model.forward_batch([t for _, t in batch], [run.job.state for run, _ in batch])
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += len(batch)
        now = time.perf_counter()
        for (run, token), state in zip(batch, states):
            job = run.job
            job.state = state
            job.tokens.append(token)
            if job.first_token_at is None:
                job.first_token_at = now
            run.sampler.record(token, penalty_weight(self.tokenizer.decode([token])),
                               penalty_decay=job.settings.penalty_decay)
        for run, token in batch:
            visible, stopped = run.stops.push(run.decoder.feed(token), run.job.settings.stop)
            if visible:
                run.job.emit(("text", visible))
            if stopped:
                self._finish(run, "stop", flush=False)

    def _finish(self, run: _Running, reason: str, flush: bool = True) -> None:
        job = run.job
        if job.finish_reason is not None:
            return
        job.finish_reason = reason
        if flush:
            rest = run.stops.release() + run.decoder.flush()
            if rest and reason != "cancelled":
                job.emit(("text", rest))
        if job.tokens and job.state is not None and job.state.logits is not None:
            self.cache.put(job.start, job.prompt + job.tokens, job.state)
        job.emit(("done", reason))

    def _drop_finished(self) -> None:
        with self._wake:
            self._running = [run for run in self._running if run.job.finish_reason is None]
