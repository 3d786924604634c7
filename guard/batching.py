"""Continuous batching: one worker thread owns the model and one running batch; requests join it.

Forward passes through one model must be serialised, so a single worker thread runs them
all. It keeps one `LiveBatch` for its lifetime (`guard.livebatch`): between two decode
steps it takes waiting requests from a bounded queue while the batch has room (up to
``max_batch`` rows) and they join at the next step (their prompts prefilled in chunks of
``prefill_tokens``); rows that finish, abort, or whose client went away (`Ticket.cancel`)
leave at once. Other model work (teacher-forced scoring, `run_exclusive`) runs on the same
thread between steps. A full queue refuses with `OverloadedError` (the API's 429); when
the batch is idle, the first arrival waits ``batch_wait_ms`` for company so a burst
shares its prompt pass.

Events cross to asyncio through ``loop.call_soon_threadsafe``:

    batcher = MicroBatcher(guarded, max_batch=32, queue_size=256, batch_wait_ms=5)
    batcher.start()
    ticket = batcher.submit(prompt_ids, SamplingParams(max_tokens=32))
    async for item in ticket.events(): ...   # TokenEvent..., then the GenerationResult
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from guard.decoding import GenerationRequest, SamplingParams, StepInfo, TokenEvent
from guard.errors import GuardError, OverloadedError, ShuttingDownError
from guard.generation import GuardedModel
from guard.livebatch import DEFAULT_PREFILL_TOKENS, LiveBatch
from guard.metrics import GuardMetrics
from guard.results import GenerationResult

log = logging.getLogger(__name__)
T = TypeVar("T")

Event = TokenEvent | GenerationResult


class Ticket:
    """One queued generation: a `GenerationSink` on the worker side, an async stream here."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        self.request = GenerationRequest(prompt_ids, params, self)
        self.enqueued_at = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = False

    # --- worker thread side (GenerationSink) ---
    def _post(self, item: Event | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancel.set()

    def on_token(self, event: TokenEvent) -> None:
        self._post(event)

    def on_finish(self, result: GenerationResult) -> None:
        self.finished = True
        self._post(result)

    def on_error(self, exc: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self._post(exc)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # --- asyncio side ---
    def cancel(self) -> None:
        """Stop generating this row at the next step (the client went away)."""
        self._cancel.set()

    async def next(self, timeout: float | None = None) -> Event:
        """The next token event or the final result; raises a worker error, or TimeoutError."""
        item = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def events(self) -> AsyncIterator[Event]:
        """Token events as they come, then the final result; raises a worker error."""
        while True:
            item = await self.next()
            yield item
            if isinstance(item, GenerationResult):
                return


def refuse(*, closed: bool, waiting: int, limit: int) -> None:
    """Refuse a new request to an engine's worker: 503 once closed, 429 when ``limit``
    requests are already waiting."""
    if closed:
        raise ShuttingDownError("the server is shutting down; retry on another replica")
    if waiting >= limit:
        raise OverloadedError(f"the request queue is full ({limit} waiting); retry shortly")


def enqueue(waiting: queue.Queue[T], item: T, *, closed: bool) -> None:
    """Queue ``item`` for an engine's worker thread, or `refuse` it."""
    refuse(closed=closed, waiting=waiting.qsize(), limit=waiting.maxsize)
    try:
        waiting.put_nowait(item)
    except queue.Full:  # filled since the check
        refuse(closed=False, waiting=waiting.maxsize, limit=waiting.maxsize)


@dataclass
class _Job:
    """Exclusive model work (e.g. teacher-forced scoring), run between decode steps."""

    fn: Callable[[], Any]
    future: Future[Any]


class MicroBatcher:
    """The worker thread, its running batch and the bounded queue in front of it.

    ``depth`` counts requests and jobs waiting for the worker (not the rows decoding)."""

    def __init__(
        self,
        guarded: GuardedModel,
        *,
        max_batch: int = 32,
        queue_size: int = 256,
        batch_wait_ms: float = 5.0,
        prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        metrics: GuardMetrics | None = None,
    ) -> None:
        self.guarded = guarded
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.prefill_tokens = prefill_tokens
        self.metrics = metrics
        self._ready = threading.Condition()  # guards the two queues below
        self._tickets: deque[Ticket] = deque()
        self._jobs: deque[_Job] = deque()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return len(self._tickets) + len(self._jobs)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="guard-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Accept nothing new; queued and running work still completes."""
        self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Close, let the worker finish the running and queued work, and join it."""
        self._closed = True
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _put(self, item: Ticket | _Job) -> None:
        with self._ready:
            refuse(closed=self._closed, waiting=self.depth, limit=self.queue_size)
            if isinstance(item, Ticket):
                self._tickets.append(item)
            else:
                self._jobs.append(item)
            self._ready.notify()
        self._gauge()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Ticket:
        """Queue a generation (call from the event loop)."""
        ticket = Ticket(asyncio.get_running_loop(), prompt_ids, params)
        self._put(ticket)
        return ticket

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between decode steps and await its result."""
        job = _Job(fn, Future())
        self._put(job)
        result: T = await asyncio.wrap_future(job.future)
        return result

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)

    def _take(self, room: int, idle: bool) -> tuple[list[_Job], list[Ticket]]:
        """Every waiting job and up to ``room`` waiting requests. An idle worker blocks for
        the first item (0.1 s at most), then lets a burst gather for ``batch_wait_s``."""
        with self._ready:
            if idle:
                self._ready.wait_for(self._has_work, timeout=0.1)
                deadline = time.monotonic() + self.batch_wait_s
                while self._tickets and len(self._tickets) < room and not self._stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)
            jobs = list(self._jobs)
            self._jobs.clear()
            tickets = [self._tickets.popleft() for _ in range(min(room, len(self._tickets)))]
        if jobs or tickets:
            self._gauge()
        return jobs, tickets

    def _has_work(self) -> bool:
        return bool(self._tickets or self._jobs) or self._stop.is_set()

    def _run(self) -> None:
        batch = self.guarded.live_batch(self._on_step, prefill_tokens=self.prefill_tokens)
        while True:
            jobs, tickets = self._take(self.max_batch - len(batch), idle=not batch)
            if not (jobs or tickets or batch) and self._stop.is_set() and not self.depth:
                return
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn())
                    except Exception as exc:  # handed to the awaiting caller
                        job.future.set_exception(exc)
            for ticket in tickets:
                if ticket.cancelled():  # the client left while it waited
                    continue
                try:
                    batch.add([ticket.request])
                except GuardError as exc:  # this request is unusable: fail it alone
                    ticket.on_error(exc)
            if batch:
                self._step(batch)

    def _step(self, batch: LiveBatch) -> None:
        try:
            batch.step()
        except Exception as exc:  # the outer edge: log, and fail only the batch's requests
            log.exception("batched generation failed")
            for request in batch.clear():
                if isinstance(request.sink, Ticket):
                    request.sink.on_error(exc)

    def _on_step(self, step: StepInfo) -> None:
        """Metrics: ``hguard_batch_size`` once per join (rows decoding right after it),
        generated tokens and guard work per token every step."""
        metrics = self.metrics
        if metrics is None:
            return
        if step.joined:
            metrics.batch_size.observe(step.batch_size)
        if step.scored_tokens == 0:
            return
        metrics.generated_tokens.inc(step.scored_tokens)
        if self.guarded.guarded:
            metrics.scoring_seconds.observe(step.scoring_seconds / step.scored_tokens)
