"""The vLLM engine thread: admit, step, hand out each step's values, cancel.

One thread owns vLLM's `LLMEngine` client (it is not thread-safe). Per turn it
1. admits what the event loop queued (generations: `Ticket`; scores: a tuple with a
   future); each request's sampling parameters tell the capture what to measure, and the
   `FrameReader` starts keeping its values under vLLM's internal request id;
2. aborts the vLLM requests of streams that were cancelled (client gone) or whose row
   finished early (stop string, policy abort), before the next step: at once;
3. runs one ``step()`` (vLLM schedules: continuous batching, chunked prefill; with vLLM's
   own processes, the outputs of the engine core's next step) and merges the frames that
   have arrived;
4. feeds every output to its request (`guard.vllm_engine.requests`), waiting for the
   frames a token still lacks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Any

from guard.batching import Ticket
from guard.errors import CaptureError
from guard.metrics import GuardMetrics
from guard.sampling import SamplingParams
from guard.vllm_engine.channel import FrameReader
from guard.vllm_engine.requests import Generation, PromptGates, Scoring, vllm_params

log = logging.getLogger(__name__)

_GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0)  # a score's single prompt pass


def _request_id(kind: str) -> str:
    return f"hguard-{kind}-{uuid.uuid4().hex[:12]}"


class EngineLoop:
    """The thread's state: live requests by vLLM's external id."""

    def __init__(
        self,
        llm: Any,
        frames: FrameReader,
        context: Any,
        gates: PromptGates,
        inbox: queue.Queue[Any],
        metrics: GuardMetrics | None,
    ) -> None:
        self.llm = llm
        self.frames = frames
        self.context = context
        self.gates = gates
        self.inbox = inbox
        self.metrics = metrics
        self.stopping = threading.Event()
        self.live: dict[str, Generation | Scoring] = {}

    def run(self) -> None:
        while not (self.stopping.is_set() and not self.live and self.inbox.empty()):
            self._admit(block=not self.live)
            self._cancel_finished()
            if not self.live:
                continue
            try:
                outputs = self.llm.step()
                self.frames.drain()
                self._dispatch(outputs)
            except Exception as exc:  # the outer edge: fail the live requests, keep serving
                log.exception("vLLM step failed")
                self._fail_all(exc)

    # --- admitting ---
    def _admit(self, *, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._add(item)
            except Exception as exc:  # bad request for vLLM (too long, ...): that one fails
                self._fail(item, exc)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.inbox.qsize())

    def _add(self, item: Any) -> None:
        from vllm.inputs import TokensPrompt

        end_ids = self.context.end_ids
        if isinstance(item, Ticket):
            if item.cancelled():
                return
            external = _request_id("gen")
            request = item.request
            live: Generation | Scoring = Generation.of(item, self.context)
            prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
            params = vllm_params(request.params, end_ids, len(request.prompt_ids))
        else:
            _, prompt_ids, response_ids, future = item
            if not future.set_running_or_notify_cancel():
                return
            external = _request_id("score")
            live = Scoring(prompt_ids, response_ids, future)
            sequence = list(prompt_ids) + list(response_ids)
            # a unique salt: no cached prefix may skip the answer tokens' forward pass
            prompt = TokensPrompt(prompt_token_ids=sequence, cache_salt=external)
            params = vllm_params(_GREEDY_ONE, end_ids, len(prompt_ids), forced=True)
        live.req_id = external  # replaced by vLLM's internal id below
        self.live[external] = live
        try:
            internal = self.llm.add_request(external, prompt, params)
        except Exception:
            del self.live[external]
            raise
        live.req_id = internal
        live.got = self.frames.expect(internal)

    def _fail(self, item: Any, exc: Exception) -> None:
        if isinstance(item, Ticket):
            item.on_error(exc)
        elif not item[3].done():
            item[3].set_exception(exc)

    # --- cancelling ---
    def _cancel_finished(self) -> None:
        gone, cancelled = [], []
        for external, live in self.live.items():
            if isinstance(live, Generation):
                if not live.row.done and live.ticket.cancelled():
                    cancelled.append(live)
                if live.row.done or live.ticket.cancelled():
                    gone.append(external)
        if gone:
            self.llm.abort_request(gone)  # first: vLLM schedules none of them again
            for external in gone:
                self._forget(external)
        for live in cancelled:
            live.row.finish("cancelled")

    def _forget(self, external: str) -> None:
        live = self.live.pop(external, None)
        if live is not None:
            self.frames.forget(live.req_id)

    # --- dispatching ---
    def _dispatch(self, outputs: list[Any]) -> None:
        started = time.perf_counter()
        scored = 0
        for output in outputs:
            live = self.live.get(output.request_id)
            if live is None:
                continue
            if isinstance(live, Generation):
                before = len(live.row.tokens)
                token_ids = list(output.outputs[0].token_ids) if output.outputs else []
                try:
                    live.feed(token_ids, self.gates, self.frames.wait)
                except CaptureError as exc:  # this request's values are missing: it fails
                    live.ticket.on_error(exc)
                    live.row.done = True  # aborted and forgotten below, like a finished row
                    continue
                scored += len(live.row.tokens) - before
                if output.finished and not live.row.done:  # vLLM stopped first
                    reason = output.outputs[0].finish_reason if output.outputs else None
                    live.row.finish("stop" if reason == "stop" else "length")
                if output.finished:
                    self._forget(output.request_id)
            elif output.finished:
                self._settle(live)
                self._forget(output.request_id)
        self._cancel_finished()  # rows the policy ended (abort, abstention): before any step
        self._observe(scored, time.perf_counter() - started)

    def _settle(self, scoring: Scoring) -> None:
        try:
            scoring.future.set_result(scoring.result(self.context, self.gates, self.frames.wait))
        except CaptureError as exc:
            scoring.future.set_exception(exc)

    def _observe(self, scored: int, seconds: float) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        metrics.batch_size.observe(len(self.live) or 1)
        if scored:
            metrics.generated_tokens.inc(scored)
            if self.context.scorer is not None:
                work = seconds + self.frames.pop_seconds()
                metrics.scoring_seconds.observe(work / scored)

    def _fail_all(self, exc: Exception) -> None:
        externals = list(self.live)
        for external in externals:
            live = self.live[external]
            if isinstance(live, Generation):
                live.ticket.on_error(exc)
            elif not live.future.done():
                live.future.set_exception(exc)
            self._forget(external)
        try:
            self.llm.abort_request(externals)
        except Exception:  # already failing; vLLM may be gone
            log.exception("could not abort the failed requests")
