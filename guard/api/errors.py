"""Every error leaves the API in OpenAI's shape, mapped from domain exceptions in one place.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model",
               "code": "model_not_found"}}

FastAPI's 422 validation errors become 400; unknown routes and methods keep their
status with the same body shape; anything unexpected is a logged 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guard.api.schemas import MESSAGES_FORM, QUESTION_FORM
from guard.errors import (
    GuardError,
    InvalidRequestError,
    OverloadedError,
    ProbeError,
    ShuttingDownError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class APIError(Exception):
    """An HTTP error with OpenAI's fields; raise it from routes and services."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-ID"] = request_id
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist; this server serves '{served}'",
        param="model",
        code="model_not_found",
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Missing or invalid API key: send 'Authorization: Bearer <key>' with a configured key",
        code="invalid_api_key",
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than this server's limit of {limit} bytes "
        "(GUARD_MAX_BODY_BYTES): send a shorter prompt", code="request_too_large",
    )  # fmt: skip


def shutting_down() -> APIError:
    return APIError(
        503, "The server is shutting down; retry on another replica",
        type="service_unavailable", code="shutting_down",
    )  # fmt: skip


def from_guard_error(exc: GuardError) -> APIError:
    """The one mapping of domain exceptions to HTTP."""
    if isinstance(exc, InvalidRequestError):
        return invalid(str(exc))
    if isinstance(exc, OverloadedError):
        return APIError(
            429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip
    if isinstance(exc, ShuttingDownError):
        return shutting_down()
    if isinstance(exc, ProbeError):
        return APIError(503, str(exc), type="service_unavailable", code="probe_unavailable")
    return APIError(500, str(exc), type="server_error", code="internal_error")


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


_NOT_FIELDS = frozenset({"body", QUESTION_FORM, MESSAGES_FORM})  # where, and union tags


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":  # loc is ("body", offset): not a parameter
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail}): send a JSON object", None
    loc = [str(part) for part in first.get("loc", ()) if part not in _NOT_FIELDS]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(_request_id(request))

    @app.exception_handler(GuardError)
    async def _guard_error(request: Request, exc: GuardError) -> JSONResponse:
        return from_guard_error(exc).response(_request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return invalid(message, param=param).response(_request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the request body could not be read: send UTF-8 encoded JSON"
        error = APIError(exc.status_code, message, type=kind)
        error.headers = dict(exc.headers or {})
        return error.response(_request_id(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (request %s)", _request_id(request))
        error = APIError(500, "internal server error", type="server_error", code="internal_error")
        return error.response(_request_id(request))
