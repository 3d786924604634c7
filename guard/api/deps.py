"""The services one app instance holds on ``app.state``, their typed accessors and Depends aliases.

@router.get("/x")
async def x(services: ServicesDep) -> ...: services.require_ready().submit(...)
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from guard.api.errors import APIError, unauthorized
from guard.audit import AuditLog
from guard.engine import Engine
from guard.metrics import GuardMetrics
from guard.settings import GuardSettings


@dataclass
class Services:
    """Everything a request may use; filled in by the app's lifespan."""

    settings: GuardSettings
    registry: CollectorRegistry
    metrics: GuardMetrics
    engine: Engine | None = None
    audit: AuditLog | None = None
    served_model_name: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    draining: bool = False
    in_flight: int = 0

    def require_ready(self) -> Engine:
        """The engine, or a 503 while loading."""
        if not self.ready or self.engine is None:
            raise APIError(
                503, "the model is still loading; retry when /readyz says ready",
                type="service_unavailable", code="not_ready",
            )  # fmt: skip
        return self.engine


def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if not isinstance(services, Services):
        raise RuntimeError("app.state.services is missing: build the app with create_app()")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def bearer_matches(header: str | None, keys: list[str]) -> bool:
    """``Authorization: Bearer <key>`` against every configured key, in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer ") :].strip().encode()
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def require_api_key(request: Request, services: ServicesDep) -> None:
    """401 unless auth is off (no GUARD_API_KEYS) or the request carries a valid key."""
    keys = services.settings.api_keys
    if keys and not bearer_matches(request.headers.get("authorization"), keys):
        raise unauthorized()


def request_id(request: Request) -> str:
    """The id the middleware gave this request (also in the access log and the audit)."""
    rid = getattr(request.state, "request_id", None)
    return str(rid) if rid else "unknown"


RequestIdDep = Annotated[str, Depends(request_id)]
