"""Dynamic micro-batching: one worker thread owns the model; requests queue for it.

Forward passes through one model must be serialised (`NeuronCapture` refuses overlapping
captures), so a single worker thread runs them all. Requests wait in a bounded queue
(full: `OverloadedError`, the API's 429); the worker takes the first, collects more for
``batch_wait_ms`` up to ``max_batch``, and decodes them as one batch. Rows that finish
(or whose client went away: `Ticket.cancel`) leave the batch at the next step. Other
model work (teacher-forced scoring) runs on the same thread between batches.

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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from guard.decoding import GenerationRequest, SamplingParams, StepInfo, TokenEvent
from guard.errors import OverloadedError, ShuttingDownError
from guard.generation import GuardedModel
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


def enqueue(waiting: queue.Queue[T], item: T, *, closed: bool) -> None:
    """Queue ``item`` for an engine's worker, or refuse: 503 once closed, 429 when full."""
    if closed:
        raise ShuttingDownError("the server is shutting down; retry on another replica")
    try:
        waiting.put_nowait(item)
    except queue.Full:
        raise OverloadedError(
            f"the request queue is full ({waiting.maxsize} waiting); retry shortly"
        ) from None


@dataclass
class _Job:
    """Exclusive model work (e.g. teacher-forced scoring), run between batches."""

    fn: Callable[[], Any]
    future: Future[Any]

    def cancelled(self) -> bool:
        return self.future.cancelled()


class MicroBatcher:
    """The worker thread and its bounded queue."""

    def __init__(
        self,
        guarded: GuardedModel,
        *,
        max_batch: int = 32,
        queue_size: int = 256,
        batch_wait_ms: float = 5.0,
        metrics: GuardMetrics | None = None,
    ) -> None:
        self.guarded = guarded
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.metrics = metrics
        self._queue: queue.Queue[Ticket | _Job] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="guard-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Accept nothing new; queued and running work still completes."""
        self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Close, let the worker finish its current batch, and join it."""
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _put(self, item: Ticket | _Job) -> None:
        enqueue(self._queue, item, closed=self._closed)
        self._gauge()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Ticket:
        """Queue a generation (call from the event loop)."""
        ticket = Ticket(asyncio.get_running_loop(), prompt_ids, params)
        self._put(ticket)
        return ticket

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between batches and await its result."""
        job = _Job(fn, Future())
        self._put(job)
        result: T = await asyncio.wrap_future(job.future)
        return result

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())

    def _collect(self) -> list[Ticket | _Job]:
        """Block for the first item, then gather more for ``batch_wait_s``."""
        try:
            items: list[Ticket | _Job] = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait_s
        while sum(isinstance(i, Ticket) for i in items) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                items.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        self._gauge()
        return items

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            items = self._collect()
            for job in (i for i in items if isinstance(i, _Job)):
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn())
                    except Exception as exc:  # handed to the awaiting caller
                        job.future.set_exception(exc)
            tickets = [i for i in items if isinstance(i, Ticket) and not i.cancelled()]
            if tickets:
                self._generate(tickets)

    def _generate(self, tickets: list[Ticket]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(tickets))
        try:
            self.guarded.generate_batch([t.request for t in tickets], self._on_step)
        except Exception as exc:  # the outer edge: log, and fail only this batch's requests
            log.exception("batched generation failed")
            for ticket in tickets:
                ticket.on_error(exc)

    def _on_step(self, step: StepInfo) -> None:
        metrics = self.metrics
        if metrics is None or step.scored_tokens == 0:
            return
        metrics.generated_tokens.inc(step.scored_tokens)
        if self.guarded.guarded:
            metrics.scoring_seconds.observe(step.scoring_seconds / step.scored_tokens)
