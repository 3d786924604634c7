"""The official `openai` client works unchanged against a real server on loopback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.servers import LiveServer


@pytest.fixture
def server(live_server: Callable[..., LiveServer]) -> LiveServer:
    return live_server(api_keys="secret-key")


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="secret-key", max_retries=0)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _guard(obj: Any) -> dict[str, Any]:
    extra = obj.model_extra or {}
    guard = extra.get("guard")
    assert isinstance(guard, dict), "the response carries the guard object"
    return guard


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        seed=1,
        user="u1",  # type: ignore[arg-type]
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in (
        "length",
        "content_filter",
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    guard = _guard(completion)
    assert guard["decision"] in ("pass", "flag", "abstain") and len(guard["tokens"]) == 6
    assert raw.headers["x-guard-decision"] == guard["decision"]
    assert float(raw.headers["x-guard-risk"]) == pytest.approx(guard["risk"], abs=1e-6)
    assert raw.headers["x-request-id"] and raw.headers["x-request-id"] in completion.id


def test_streaming_chat(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    verdict = _guard(finals[0])
    assert verdict["decision"] in ("pass", "flag", "abstain") and verdict["aborted"] is False
    token_chunks = [c for c in chunks if c.choices and _guard(c)["tokens"]]
    assert len(token_chunks) == 5
    assert all(isinstance(_guard(c)["risk"], float) for c in token_chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    non_streamed = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        temperature=0,  # type: ignore[arg-type]
    )
    if verdict["decision"] != "abstain":
        assert content == non_streamed.choices[0].message.content
    assert verdict["risk"] == pytest.approx(_guard(non_streamed)["risk"], abs=1e-6)


def test_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert completion.choices[0].finish_reason in ("length", "content_filter")
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert len(_guard(completion)["tokens"]) == 4
    streamed = list(
        client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    assert streamed[-1].choices[0].finish_reason == "length"


def test_errors_have_openai_shape_and_status(server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=2)  # type: ignore[arg-type]
    assert "n > 1" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10_000)  # type: ignore[arg-type]
    wrong_key = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong_key.models.list()
    assert auth.value.code == "invalid_api_key"
