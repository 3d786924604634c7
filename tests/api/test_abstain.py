"""Abstain withholds: a non-streamed abstained answer is nowhere in the response (body,
``guard`` object, headers) nor in the logs, only in the audit log; a stream keeps its
text (already sent); ``/v1/guard/score`` returns the client's own text."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from guard.api.responses import ChatCompletionChunk, GuardObject
from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.servers import AppFactory

MESSAGE = "Withheld."
QUESTION = "What is the capital of France?"
CHAT: dict[str, Any] = {
    "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
    "max_tokens": 12, "temperature": 0,
}  # fmt: skip
TEXT: dict[str, Any] = {"model": MODEL, "prompt": QUESTION, "max_tokens": 12, "temperature": 0}


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _abstaining(make_app: AppFactory, tmp_path: Path, **overrides: Any) -> Any:
    """An app whose thresholds make every judged answer abstain, with an audit log."""
    return make_app(
        flag_threshold=0.0, abstain_threshold=0.0, abstain_message=MESSAGE,
        audit_log=tmp_path / "audit.jsonl", **overrides,
    )  # fmt: skip


def _audited(tmp_path: Path) -> dict[str, Any]:
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    record: dict[str, Any] = json.loads(line)
    return record


@pytest.mark.parametrize(
    ("route", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", TEXT)]
)
def test_an_abstained_answer_is_withheld_everywhere_but_the_audit_log(
    make_app: AppFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    route: str,
    body: dict[str, Any],
) -> None:
    caplog.set_level(logging.DEBUG)
    with TestClient(_abstaining(make_app, tmp_path)) as client:
        response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    answer = _audited(tmp_path)["answer"]
    assert len(answer.strip()) >= 4  # long enough that finding it would mean something
    reply = response.json()
    choice = reply["choices"][0]
    assert (choice["message"]["content"] if "message" in choice else choice["text"]) == MESSAGE
    assert choice["finish_reason"] == "content_filter"
    guard = GuardObject.model_validate(reply["guard"])
    assert guard.decision == "abstain" and guard.withheld
    assert len(guard.tokens) == reply["usage"]["completion_tokens"] == 12
    assert all(t.text is None and t.risk is not None for t in guard.tokens)  # risks stay
    assert not any(answer in s for s in _strings(reply)), "the answer leaked into the body"
    assert answer not in response.text
    assert not any(answer in f"{k}: {v}" for k, v in response.headers.items())
    assert caplog.records and answer not in caplog.text  # the audit line is logged, not its text


def test_a_passed_answer_carries_its_text_and_tokens(make_app: AppFactory) -> None:
    with TestClient(make_app(flag_threshold=1.0, abstain_threshold=1.0)) as client:
        reply = client.post("/v1/chat/completions", json=CHAT).json()
    guard = GuardObject.model_validate(reply["guard"])
    assert guard.decision == "pass" and not guard.withheld
    assert (
        reply["choices"][0]["message"]["content"]
        and reply["choices"][0]["finish_reason"] == "length"
    )
    assert len(guard.tokens) == 12 and all(t.text is not None for t in guard.tokens)


def test_a_stream_keeps_its_text_and_its_last_chunk_says_abstain(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """Streaming cannot take back what was sent: the documented semantics."""
    with (
        TestClient(_abstaining(make_app, tmp_path)) as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    chunks = [ChatCompletionChunk.model_validate_json(line) for line in lines]
    sent = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert sent == _audited(tmp_path)["answer"] and MESSAGE not in sent
    final = chunks[-1].guard
    assert isinstance(final, GuardObject) and final.decision == "abstain"
    assert not final.withheld and not final.aborted
    assert chunks[-1].choices[0].finish_reason == "length"
    tokens = [t for c in chunks[:-1] if c.guard for t in c.guard.tokens]
    assert all(t.text is not None for t in tokens) and len(tokens) == 12


def test_score_returns_the_clients_own_text_even_when_it_abstains(
    make_app: AppFactory, tmp_path: Path
) -> None:
    answer = "Paris is the capital of France."
    with TestClient(_abstaining(make_app, tmp_path)) as client:
        response = client.post("/v1/guard/score", json={"question": QUESTION, "answer": answer})
    guard = GuardObject.model_validate(response.json()["guard"])
    assert guard.decision == "abstain" and response.headers["x-guard-decision"] == "abstain"
    assert not guard.withheld and "".join(t.text or "" for t in guard.tokens) == answer
    assert _audited(tmp_path)["answer"] == answer


@pytest.fixture(scope="module")
def unknown_guarded(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model under a probe whose knowledge gate gives every prompt risk ~1 (its
    answer thresholds at 1: only the prompt can make it abstain)."""
    from guard.generation import GuardedModel
    from guard.probe import load_probe
    from tests.fixtures.probes import write_probe

    directory = write_probe(
        tmp_path_factory.mktemp("unknown"), tiny_model, flag=1.0, abstain=1.0,
        knowledge_bias=50.0,
    )  # fmt: skip
    return GuardedModel(tiny_model, load_probe(directory))


def test_a_prompt_the_model_cannot_know_is_abstained_before_generating(
    make_app: AppFactory, unknown_guarded: Any
) -> None:
    app = make_app(unknown_guarded, abstain_message=MESSAGE, knowledge_gate=True)
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=CHAT).json()
        with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
        metrics = client.get("/metrics").text
    guard = GuardObject.model_validate(reply["guard"])
    assert reply["choices"][0]["message"]["content"] == MESSAGE
    assert reply["choices"][0]["finish_reason"] == "content_filter"
    assert guard.decision == "abstain" and guard.withheld and not guard.aborted
    assert guard.tokens == [] and reply["usage"]["completion_tokens"] == 0
    assert guard.prompt_risk == pytest.approx(1.0) and guard.risk is None
    assert guard.thresholds is not None and guard.thresholds.prompt_abstain == 0.8
    chunks = [ChatCompletionChunk.model_validate_json(line) for line in lines]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    final = chunks[-1].guard
    assert isinstance(final, GuardObject) and final.decision == "abstain"
    assert chunks[0].guard is not None and chunks[0].guard.prompt_risk == pytest.approx(1.0)
    assert "hguard_abstained_before_generation_total 2.0" in metrics


def test_with_early_abstention_off_the_answer_is_generated_then_withheld(
    make_app: AppFactory, unknown_guarded: Any
) -> None:
    app = make_app(
        unknown_guarded, abstain_message=MESSAGE, knowledge_gate=True,
        abstain_before_generation=False,
    )  # fmt: skip
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=CHAT).json()
        metrics = client.get("/metrics").text
    guard = GuardObject.model_validate(reply["guard"])
    assert reply["choices"][0]["message"]["content"] == MESSAGE
    assert guard.decision == "abstain" and reply["usage"]["completion_tokens"] > 0
    assert "hguard_abstained_before_generation_total 0.0" in metrics


def test_by_default_the_prompt_risk_is_reported_not_acted_on(
    make_app: AppFactory, unknown_guarded: Any
) -> None:
    with TestClient(make_app(unknown_guarded)) as client:
        reply = client.post("/v1/chat/completions", json=CHAT).json()
    guard = GuardObject.model_validate(reply["guard"])
    assert guard.prompt_risk == pytest.approx(1.0) and guard.decision == "pass"
    assert guard.thresholds is not None and guard.thresholds.prompt_flag is None
    assert reply["usage"]["completion_tokens"] > 0
