"""create_app(settings): the FastAPI application, its services, middleware and lifespan.

Nothing is built at import time. The lifespan builds the engine (`guard.engine`): the
transformers engine on a loaded model (unless an already configured `GuardedModel` is
given, as tests and `run_server` do), or whatever ``engine_factory`` builds (the vLLM
engine); it starts it, and stops it on shutdown; ``/readyz`` says ready only in between.

    app = create_app(GuardSettings(probe="default"))
    app = create_app(settings, engine_factory=lambda metrics: VLLMEngine(settings, metrics))
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard import __version__
from guard.api import routes, ui
from guard.api.deps import Services
from guard.api.errors import body_too_large, install_error_handlers, shutting_down
from guard.api.openapi import install_openapi
from guard.audit import AuditLog
from guard.batching import MicroBatcher
from guard.engine import Engine, TransformersEngine
from guard.generation import GuardedModel
from guard.loading import load_guarded
from guard.metrics import GuardMetrics
from guard.settings import GuardSettings, get_settings

log = logging.getLogger(__name__)
access_log = logging.getLogger("guard.access")

KNOWN_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/guard/score", "/healthz",
     "/readyz", "/metrics", "/ui"}
)  # fmt: skip
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


EngineFactory = Callable[[GuardMetrics], Engine]


def transformers_engine(guarded: GuardedModel, services: Services) -> TransformersEngine:
    """Our own decode loop on a configured model, sized by the settings."""
    settings = services.settings
    return TransformersEngine(
        MicroBatcher(
            guarded, max_batch=settings.max_batch, queue_size=settings.queue_size,
            batch_wait_ms=settings.batch_wait_ms, metrics=services.metrics,
        )
    )  # fmt: skip


def start_services(services: Services, engine: Engine) -> None:
    """Wire an engine into the services and start it."""
    settings, metrics = services.settings, services.metrics
    engine.start()
    services.engine = engine
    services.served_model_name = settings.served_model_name or engine.model_id
    if settings.audit_log is not None:
        services.audit = AuditLog(settings.audit_log)
    info = engine.info
    metrics.set_build_info(
        model=services.served_model_name, probe=info.probe_name or "none",
        probe_sha256=info.probe_sha256 or "", guarded=engine.guarded,
    )  # fmt: skip
    metrics.set_validation_quantiles(engine.validation_risk_quantiles)
    services.ready = True
    log.info(
        "serving %s (%s, probe %s)", services.served_model_name,
        "guarded" if engine.guarded else "UNGUARDED", info.probe_name,
    )  # fmt: skip


class RequestContext:
    """Pure ASGI middleware: request id, draining 503s, access log, request metrics."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        services, metrics = self.services, self.services.metrics
        rid = _request_id(scope)
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = rid, started
        path: str = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", rid)
            await send(message)

        counted = path.startswith("/v1/")
        if counted:
            services.in_flight += 1
            metrics.requests_in_flight.inc()
        limit = services.settings.max_body_bytes
        try:
            if counted and services.draining:
                await shutting_down().response(rid)(scope, receive, send_with_id)
            elif _content_length(scope) > limit:  # refused before reading (or tokenising) it
                await body_too_large(limit).response(rid)(scope, receive, send_with_id)
            else:
                await self.app(scope, _limited(receive, limit), send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            if counted:
                services.in_flight -= 1
                metrics.requests_in_flight.dec()
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.request_duration.labels(route=route).observe(elapsed)
            access_log.info(
                '%s "%s %s" %d %.3fs request_id=%s', _client(scope), scope["method"], path,
                status, elapsed, rid,
            )  # fmt: skip


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that refuses a body past ``limit`` bytes (chunked: no Content-Length)."""
    received = 0

    async def receive_limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:  # FastAPI re-raises HTTPExceptions from body reading
                raise StarletteHTTPException(413, detail=body_too_large(limit).message)
        return message

    return receive_limited


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def create_app(
    settings: GuardSettings | None = None,
    *,
    guarded: GuardedModel | None = None,
    engine_factory: EngineFactory | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The app; loads model and probe in its lifespan (`guard.loading.load_guarded`) unless
    ``guarded`` is given, already configured (`guard.loading.configured`): it is used as is.
    ``engine_factory`` (given the app's metrics) replaces the transformers engine."""
    settings = settings or get_settings()
    registry = registry if registry is not None else CollectorRegistry()
    services = Services(settings=settings, registry=registry, metrics=GuardMetrics(registry))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine: Engine
        if engine_factory is not None:
            engine = await asyncio.to_thread(engine_factory, services.metrics)
        else:
            model = (
                guarded if guarded is not None else await asyncio.to_thread(load_guarded, settings)
            )
            engine = transformers_engine(model, services)
        start_services(services, engine)
        try:
            yield
        finally:
            services.ready = False
            if services.engine is not None:
                await asyncio.to_thread(services.engine.stop, settings.shutdown_grace_s)
            if services.audit is not None:
                services.audit.close()

    app = FastAPI(title="hallucination-guard", version=__version__, lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(RequestContext, services=services)
    app.include_router(routes.v1)
    app.include_router(routes.ops)
    app.include_router(ui.router)  # the browser playground at /ui (guard/api/ui.py)
    install_openapi(app, services)
    return app
