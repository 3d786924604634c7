"""Bad input: every malformed request is a 4xx in OpenAI's error shape whose message says
what to fix, answered quickly, and the server keeps serving normal requests after each."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from guard.api.app import create_app
from guard.generation import GuardedModel
from guard.settings import GuardSettings
from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.servers import serve_in_thread
from tests.hardening.helpers import is_openai_error

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
SCORE = "/v1/guard/score"
MAX_PROMPT_TOKENS = 64
MAX_NEW_TOKENS = 8
MAX_BODY_BYTES = 65_536
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base_url(tiny_guarded: GuardedModel) -> Iterator[str]:
    settings = GuardSettings(
        max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=MAX_NEW_TOKENS,
        max_body_bytes=MAX_BODY_BYTES,
    )  # fmt: skip
    app = create_app(settings, guarded=tiny_guarded, registry=CollectorRegistry())
    with serve_in_thread(app) as url:
        yield url


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, **fields}


def raw(text: str) -> bytes:
    return text.encode()


# (name, path, body: dict = JSON, bytes = sent as is, expected status, words the message holds)
CASES: list[tuple[str, str, Any, int, tuple[str, ...]]] = [
    ("invalid JSON", CHAT, raw('{"model": "x", "messages": ['), 400, ("JSON",)),
    ("not an object", CHAT, [1, 2], 400, ("object",)),
    (
        "invalid UTF-8",
        CHAT,
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}',
        400,
        ("UTF-8",),
    ),
    ("messages not a list", CHAT, chat(messages="hi"), 400, ("messages", "list")),
    (
        "content wrong type",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        ("content",),
    ),
    ("empty messages", CHAT, chat(messages=[]), 400, ("messages", "at least 1")),
    ("missing messages", CHAT, {"model": MODEL}, 400, ("messages", "required")),
    ("missing model", CHAT, {"messages": HI}, 400, ("model", "required")),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, ("role",)),
    (
        "prompt over the token limit",
        CHAT,
        chat(messages=[{"role": "user", "content": "x y " * 40}]),
        400,
        ("GUARD_MAX_PROMPT_TOKENS", "shorten"),
    ),
    (
        "very long single token",
        CHAT,
        chat(messages=[{"role": "user", "content": "a" * 60_000}]),
        400,
        ("GUARD_MAX_PROMPT_TOKENS",),
    ),
    (
        "max_tokens over the cap",
        CHAT,
        chat(max_tokens=MAX_NEW_TOKENS + 1),
        400,
        ("max_tokens", "GUARD_MAX_NEW_TOKENS"),
    ),
    ("max_tokens huge", CHAT, chat(max_tokens=2**70), 400, ("max_tokens",)),
    ("max_tokens negative", CHAT, chat(max_tokens=-1), 400, ("max_tokens", "greater than")),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, ("max_tokens",)),
    (
        "max_completion_tokens negative",
        CHAT,
        chat(max_completion_tokens=-5),
        400,
        ("max_completion_tokens",),
    ),
    (
        "temperature NaN",
        CHAT,
        raw(json.dumps(chat(temperature=float("nan")))),
        400,
        ("temperature",),
    ),
    (
        "temperature inf",
        CHAT,
        raw(json.dumps(chat(temperature=float("inf")))),
        400,
        ("temperature",),
    ),
    ("temperature negative", CHAT, chat(temperature=-0.5), 400, ("temperature",)),
    ("temperature a string", CHAT, chat(temperature="hot"), 400, ("temperature", "number")),
    ("top_p NaN", CHAT, raw(json.dumps(chat(top_p=float("nan")))), 400, ("top_p",)),
    ("top_p -inf", CHAT, raw(json.dumps(chat(top_p=float("-inf")))), 400, ("top_p",)),
    ("top_p negative", CHAT, chat(top_p=-0.1), 400, ("top_p",)),
    ("top_p zero", CHAT, chat(top_p=0), 400, ("top_p",)),
    ("n > 1", CHAT, chat(n=3), 400, ("n > 1", "one request per choice")),
    ("seed out of range", CHAT, chat(seed=2**70), 400, ("seed",)),
    ("too many stops", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, ("stop",)),
    ("unknown model", CHAT, chat(model="gpt-4o"), 404, ("gpt-4o", MODEL)),
    (
        "oversized body",
        CHAT,
        chat(messages=[{"role": "user", "content": "x" * 200_000}]),
        413,
        ("GUARD_MAX_BODY_BYTES",),
    ),
    (
        "text: token id out of range",
        TEXT,
        {"model": MODEL, "prompt": [1, 10**9]},
        400,
        ("token ids",),
    ),
    ("text: empty prompt", TEXT, {"model": MODEL, "prompt": ""}, 400, ("prompt", "empty")),
    (
        "text: several prompts",
        TEXT,
        {"model": MODEL, "prompt": ["a", "b"]},
        400,
        ("one prompt per request",),
    ),
    ("text: best_of > 1", TEXT, {"model": MODEL, "prompt": "a", "best_of": 2}, 400, ("best_of",)),
    ("text: echo", TEXT, {"model": MODEL, "prompt": "a", "echo": True}, 400, ("echo",)),
    ("score: neither form", SCORE, {"model": MODEL}, 400, ("either", "question", "messages")),
    (
        "score: an empty message",
        SCORE,
        {"messages": [*HI, {"role": "assistant", "content": ""}]},
        400,
        ("messages",),
    ),
    ("score: empty answer", SCORE, {"question": "q?", "answer": ""}, 400, ("answer", "empty")),
    ("score: missing answer", SCORE, {"question": "q?"}, 400, ("answer",)),
    (
        "score: both forms",
        SCORE,
        {"question": "q", "answer": "a", "messages": HI},
        400,
        ("either",),
    ),
    (
        "score: too long",
        SCORE,
        {"question": "q " * 100, "answer": "a"},
        400,
        ("GUARD_MAX_PROMPT_TOKENS",),
    ),
    (
        "score: unknown model",
        SCORE,
        {"model": "gpt-4o", "question": "q", "answer": "a"},
        404,
        ("gpt-4o",),
    ),
]


def send(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize(
    ("path", "body", "status", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_is_a_clear_4xx_and_the_server_keeps_serving(
    base_url: str, path: str, body: Any, status: int, words: tuple[str, ...]
) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        started = time.monotonic()
        response = send(client, path, body)
        elapsed = time.monotonic() - started
        assert response.status_code == status, response.text
        error = response.json()
        assert is_openai_error(error), error
        message = error["error"]["message"]
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
        assert response.headers["x-request-id"]
        assert elapsed < 5.0, f"a bad request took {elapsed:.1f} s to refuse"
        ok = client.post(CHAT, json=chat(max_tokens=2, temperature=0))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_vanishing_temperature_samples_like_greedy(base_url: str) -> None:
    """Valid, and at the edge: a temperature too small to divide by is sampling's limit."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        tiny = client.post(CHAT, json=chat(max_tokens=4, temperature=1e-308, seed=1))
        greedy = client.post(CHAT, json=chat(max_tokens=4, temperature=0))
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"] == greedy.json()["choices"]


def test_chunked_oversized_body_is_refused(base_url: str) -> None:
    """Without Content-Length the limit applies while reading."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024
        yield b'"}]}'

    with httpx.Client(base_url=base_url, timeout=30) as client:
        response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and is_openai_error(response.json())
        assert "GUARD_MAX_BODY_BYTES" in response.json()["error"]["message"]
        assert client.post(CHAT, json=chat(max_tokens=1)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", CHAT, 405), ("POST", "/v1/nope", 404), ("DELETE", "/v1/models", 405),
     ("GET", "/v1/models/gpt-4o", 404)],
)  # fmt: skip
def test_wrong_routes_and_methods_keep_the_error_shape(
    base_url: str, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, base_url + path, timeout=10)
    assert response.status_code == status and is_openai_error(response.json())


def test_bad_streaming_request_fails_before_the_stream(base_url: str) -> None:
    """A stream request with bad fields gets a plain 4xx JSON body, not an event stream."""
    response = httpx.post(f"{base_url}{CHAT}", json=chat(stream=True, top_p=2), timeout=10)
    assert response.status_code == 400 and is_openai_error(response.json())
    assert response.headers["content-type"].startswith("application/json")
