"""Thin routers: parse, delegate to `guard.api.serving`, return.

``/v1/*`` needs an API key when GUARD_API_KEYS is set; health, readiness and metrics never do.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from guard.api.deps import RequestIdDep, ServicesDep, require_api_key
from guard.api.errors import APIError, model_not_found
from guard.api.openapi import streamed
from guard.api.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    ModelCard,
    ModelList,
    Readiness,
    ScoreResponse,
    TextCompletion,
    TextCompletionChunk,
)
from guard.api.schemas import ChatCompletionRequest, CompletionRequest, ScoreRequest
from guard.api.scoring import score_answer
from guard.api.serving import prepare_chat, prepare_completion, respond

# Documented in /openapi.json (fuzzed against it: tests/hardening/test_fuzz.py).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request: the message says what to fix"),
        (401, "missing or invalid API key"),
        (404, "unknown model"),
        (413, "request body over GUARD_MAX_BODY_BYTES"),
        (429, "request queue full: retry after Retry-After seconds"),
        (503, "loading or shutting down"),
        (504, "generation took longer than GUARD_REQUEST_TIMEOUT_S"),
    )
}
SCORED: dict[int | str, dict[str, Any]] = {
    200: {"model": ScoreResponse, "description": "the guard object of the given answer"}
}

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
ops = APIRouter()


def _started(request: Request) -> float:
    return float(getattr(request.state, "started", 0.0))


@v1.post("/chat/completions", responses=streamed(ChatCompletion, ChatCompletionChunk))
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, rid: RequestIdDep
) -> Response:
    prep = prepare_chat(services, body, rid, _started(request))
    return await respond(services, prep, request.is_disconnected)


@v1.post("/completions", responses=streamed(TextCompletion, TextCompletionChunk))
async def completions(
    body: CompletionRequest, request: Request, services: ServicesDep, rid: RequestIdDep
) -> Response:
    prep = prepare_completion(services, body, rid, _started(request))
    return await respond(services, prep, request.is_disconnected)


@v1.get("/models")
async def list_models(services: ServicesDep) -> ModelList:
    return ModelList(data=[ModelCard(id=services.served_model_name, created=services.created)])


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, services: ServicesDep) -> ModelCard:
    if model_id != services.served_model_name:
        raise model_not_found(model_id, services.served_model_name)
    return ModelCard(id=services.served_model_name, created=services.created)


@v1.post("/guard/score", responses=SCORED)
async def guard_score(
    body: Annotated[ScoreRequest, Body()], services: ServicesDep, rid: RequestIdDep
) -> Response:
    return await score_answer(services, body, rid)


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", responses={503: ERROR_RESPONSES[503]})
async def readyz(services: ServicesDep) -> Readiness:
    if services.draining:
        raise APIError(503, "shutting down", type="service_unavailable", code="shutting_down")
    if not services.ready or services.engine is None:
        raise APIError(503, "model loading", type="service_unavailable", code="not_ready")
    engine = services.engine
    return Readiness(
        model=services.served_model_name, guarded=engine.guarded,
        probe=engine.info.probe_name, probe_sha256=engine.info.probe_sha256,
    )  # fmt: skip


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics(services: ServicesDep) -> Response:
    return PlainTextResponse(generate_latest(services.registry), media_type=CONTENT_TYPE_LATEST)
