"""``/openapi.json`` as this server really behaves (the fuzz test holds it to that).

FastAPI's schema, plus what it cannot know on its own:
- validation errors are 400s here (`guard.api.errors`), never FastAPI's 422;
- the limits that come from settings and model: ``max_tokens`` up to GUARD_MAX_NEW_TOKENS,
  a token-id prompt up to GUARD_MAX_PROMPT_TOKENS ids below the vocabulary size;
- the stream chunk models, as the JSON in each ``data:`` of a ``text/event-stream``.

    install_openapi(app, services)   # in create_app
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from guard.api.deps import Services
from guard.api.responses import ChatCompletionChunk, ErrorResponse, TextCompletionChunk

CHUNKS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, TextCompletionChunk)
REF = "#/components/schemas/{model}"


def streamed(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 response of a completion route: ``body`` as JSON, or a stream of ``chunk``."""
    return {
        200: {
            "model": body,
            "description": (
                "JSON; with stream=true, server-sent events: one `data:` line per chunk "
                f'({chunk.__name__}), an `{{"error": ...}}` event if generation fails '
                "mid-stream, then `data: [DONE]`"
            ),
            "content": {"text/event-stream": {"schema": _event(chunk)}},
        }
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (Open API 3.1 reads an event stream's schema per event)."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"oneOf": [_ref(chunk), _ref(ErrorResponse)]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [json_data, {"const": "[DONE]"}]}},
    }


def install_openapi(app: FastAPI, services: Services) -> None:
    """Replace ``app.openapi`` by FastAPI's schema with this server's facts added."""
    build = app.openapi  # FastAPI's builder (it caches its result; we edit a copy)

    def openapi() -> dict[str, Any]:
        schema = copy.deepcopy(build())
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):  # only 422s named them
            components.pop(unused, None)
        _, chunks = models_json_schema([(c, "serialization") for c in CHUNKS], ref_template=REF)
        for name, definition in chunks.get("$defs", {}).items():
            components.setdefault(name, definition)
        _limit_requests(components, services)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _vocab_size(services: Services) -> int | None:
    engine = services.engine
    return None if engine is None else engine.vocab_size


def _limit_requests(components: dict[str, Any], services: Services) -> None:
    settings = services.settings
    for request, field in (
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
        ("CompletionRequest", "max_tokens"),
    ):
        for branch in _branches(components[request]["properties"][field]):
            if branch.get("type") == "integer":
                branch["maximum"] = settings.max_new_tokens
    vocab = _vocab_size(services)
    for branch in _branches(components["CompletionRequest"]["properties"]["prompt"]):
        if branch.get("type") == "array" and branch["items"].get("type") == "integer":
            branch["maxItems"] = settings.max_prompt_tokens
            if vocab is not None:
                branch["items"]["maximum"] = vocab - 1


def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return list(prop.get("anyOf", [prop]))
