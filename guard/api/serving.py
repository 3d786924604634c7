"""Serving logic of the completion endpoints: validate, queue, stream or collect, judge, audit.

Routes stay thin: they parse (`guard.api.schemas`), then call `prepare_chat` or
`prepare_completion` and `respond`. Chat and text completions share everything but the
prompt encoding; every body and chunk is built by `guard.api.bodies`, which also
withholds an abstained answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from guard.api.bodies import (
    Envelope,
    Kind,
    completion,
    guard_headers,
    role_chunk,
    sse,
    token_chunk,
    usage_chunk,
    verdict_chunk,
)
from guard.api.deps import Services
from guard.api.errors import APIError, from_guard_error, invalid, model_not_found
from guard.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from guard.decoding import SamplingParams, TokenEvent
from guard.engine import TokenStream
from guard.errors import GuardError
from guard.results import Decision, GenerationResult

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


@dataclass(frozen=True)
class Prepared:
    """A validated completion request, ready to queue."""

    kind: Kind
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None
    started: float  # perf_counter() at arrival
    created: int

    @property
    def envelope(self) -> Envelope:
        """Id, time and model every body of this completion shares."""
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        return Envelope(self.kind, f"{prefix}-{self.request_id}", self.created, self.model)


def check_model(services: Services, model: str | None) -> str:
    """The served name, or 404 for any other model name."""
    served = services.served_model_name
    if model is not None and model != served:
        raise model_not_found(model, served)
    return served


def _params(
    services: Services, body: SamplingFields, requested: int | None, stop: tuple[str, ...] = ()
) -> SamplingParams:
    limit = services.settings.max_new_tokens
    if requested is not None and requested > limit:
        raise invalid(
            f"max_tokens {requested} exceeds this server's limit of {limit} (GUARD_MAX_NEW_TOKENS)",
            param="max_tokens",
        )
    return SamplingParams(
        max_tokens=requested or limit,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_strings() + tuple(s for s in stop if s not in body.stop_strings()),
        abort=body.stream,
    )


def _prepared(
    services: Services,
    kind: Kind,
    body: SamplingFields,
    ids: list[int],
    rid: str,
    started: float,
    stop: tuple[str, ...] = (),
) -> Prepared:
    limit = services.settings.max_prompt_tokens
    if len(ids) > limit:
        raise invalid(
            f"the prompt has {len(ids)} tokens, more than this server's limit of {limit} "
            "(GUARD_MAX_PROMPT_TOKENS): shorten it",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    if not ids:
        raise invalid("the prompt is empty", param="prompt")
    return Prepared(
        kind=kind, request_id=rid, model=check_model(services, body.model), prompt_ids=ids,
        params=_params(services, body, body.requested_max_tokens(), stop), stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user, started=started, created=int(time.time()),
    )  # fmt: skip


def prepare_chat(
    services: Services, body: ChatCompletionRequest, rid: str, started: float
) -> Prepared:
    engine = services.require_ready()
    check_model(services, body.model)
    ids = engine.encode_chat([message.as_template() for message in body.messages])
    # A base model's chat turn ends at its recipe's stop strings (`guard.prompts`).
    return _prepared(services, "chat", body, ids, rid, started, engine.chat_stop)


def prepare_completion(
    services: Services, body: CompletionRequest, rid: str, started: float
) -> Prepared:
    engine = services.require_ready()
    check_model(services, body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = engine.vocab_size
        ids = [int(i) for i in prompt]
        if any(i < 0 or i >= vocab for i in ids):
            raise invalid(f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
    else:
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        ids = engine.encode_text(text)
    return _prepared(services, "text", body, ids, rid, started)


Disconnected = Callable[[], Awaitable[bool]]
DISCONNECT_POLL_S = 0.25


async def respond(
    services: Services, prep: Prepared, disconnected: Disconnected | None = None
) -> Response:
    """Queue the request; a JSON body or an SSE stream. A non-streamed request whose
    client hangs up (``disconnected()`` turns true) stops generating within a poll."""
    ticket = services.require_ready().submit(prep.prompt_ids, prep.params)
    services.metrics.prompt_tokens.inc(len(prep.prompt_ids))
    if prep.stream:
        return StreamingResponse(
            _sse(services, prep, ticket),
            media_type="text/event-stream",
            headers={"X-Request-ID": prep.request_id, "Cache-Control": "no-cache"},
        )
    collecting = asyncio.ensure_future(_collect(services, prep, ticket))
    watching = asyncio.ensure_future(_watch(disconnected))
    try:
        async with asyncio.timeout(services.settings.request_timeout_s):
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        raise _timeout(services) from None
    finally:
        ticket.cancel()  # no-op once finished; frees the row if the client went away
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
    if not collecting.done():  # the client hung up: nobody reads this
        log.info("request %s: client went away, generation stopped", prep.request_id)
        return Response(status_code=499)
    result = collecting.result()
    await _record(services, prep, result)
    return _full_response(services, prep, result)


async def _watch(disconnected: Disconnected | None) -> None:
    """Return once the client has hung up (never, without a way to ask)."""
    if disconnected is None:
        await asyncio.Event().wait()
        return
    while not await disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _timeout(services: Services) -> APIError:
    return APIError(
        504, f"generation took longer than {services.settings.request_timeout_s} s "
        "(GUARD_REQUEST_TIMEOUT_S); ask for fewer tokens", type="timeout", code="request_timeout",
    )  # fmt: skip


async def _collect(services: Services, prep: Prepared, ticket: TokenStream) -> GenerationResult:
    timer = _TokenTimer(services, prep.started)
    async for item in ticket.events():
        if isinstance(item, TokenEvent):
            timer.tick()
        else:
            return item
    raise RuntimeError("the event stream ended without a result")


class _TokenTimer:
    """Time to first token and inter-token latency, as the client sees them."""

    def __init__(self, services: Services, started: float) -> None:
        self._metrics = services.metrics
        self._last: float | None = None
        self._started = started

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._started)
        else:
            self._metrics.inter_token_latency.observe(now - self._last)
        self._last = now


def _full_response(services: Services, prep: Prepared, result: GenerationResult) -> JSONResponse:
    body = completion(prep.envelope, result, services.settings.abstain_message)
    headers = guard_headers(result, prep.request_id)
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


async def _sse(services: Services, prep: Prepared, ticket: TokenStream) -> AsyncIterator[str]:
    """The event stream: a token chunk per token, the verdict, usage if asked, ``[DONE]``."""
    guarded = services.engine is not None and services.engine.guarded
    timer = _TokenTimer(services, prep.started)
    deadline = time.monotonic() + services.settings.request_timeout_s
    env, role_pending = prep.envelope, prep.kind == "chat"
    try:
        while True:
            item = await ticket.next(_left(deadline))
            if role_pending:  # sent with the first event, so it already carries the scope
                yield sse(role_chunk(env, item, guarded))
                role_pending = False
            if isinstance(item, TokenEvent):
                timer.tick()
                yield sse(token_chunk(env, item, guarded))
                continue
            await _record(services, prep, item)
            yield sse(verdict_chunk(env, item))
            if prep.include_usage:
                yield sse(usage_chunk(env, item))
            break
    except TimeoutError:
        yield _error_event(_timeout(services))
    except GuardError as exc:
        yield _error_event(from_guard_error(exc))
    except Exception:  # the outer edge of a stream: log, tell the client, end cleanly
        log.exception("stream %s failed", prep.request_id)
        yield _error_event(APIError(500, "internal server error", type="server_error"))
    finally:
        ticket.cancel()  # the client went away or we are done: free the row now
    yield "data: [DONE]\n\n"


def _error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _record(services: Services, prep: Prepared, result: GenerationResult) -> None:
    """Metrics for a finished answer, and its audit line when flagged or abstained."""
    if result.finish_reason == "cancelled":
        return
    services.metrics.observe_verdict(result)
    if services.audit is None or result.decision is Decision.PASS:
        return
    record = {
        "request_id": prep.request_id, "route": prep.kind, "model": prep.model,
        "user": prep.user, "risk": result.risk, "decision": result.decision.value,
        "aborted": result.aborted, "finish_reason": result.finish_reason,
        "answer": result.text, "probe": result.info.probe_name,
        "probe_sha256": result.info.probe_sha256,
    }  # fmt: skip
    await asyncio.to_thread(services.audit.write, record)
    log.info("request %s: %s (risk %.3f) audited", prep.request_id, result.decision.value,
             result.risk or 0.0)  # fmt: skip
