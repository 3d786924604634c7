"""HTTP behaviour through TestClient: headers, SSE, auth, back-pressure, metrics, audit."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from guard.engine import TransformersEngine
from guard.errors import ProbeError
from guard.generation import GuardedModel
from guard.loading import load_guarded
from guard.model import LoadedModel
from guard.probe import load_probe
from guard.settings import GuardSettings
from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import AppFactory, services_of

CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 4,
    "temperature": 0,
}


def _events(lines: list[str]) -> list[Any]:
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def test_headers_and_usage(make_app: AppFactory) -> None:
    with TestClient(make_app()) as client:
        response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "r-1"})
    body = response.json()
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "r-1" and body["id"] == "chatcmpl-r-1"
    assert response.headers["x-guard-decision"] == body["guard"]["decision"]
    assert float(response.headers["x-guard-risk"]) == pytest.approx(body["guard"]["risk"])
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4


def test_sse_shape(make_app: AppFactory) -> None:
    with (
        TestClient(make_app()) as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(list(response.iter_lines()))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    tokens = events[1:-1]
    assert len(tokens) == 4
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert all(len(e["guard"]["tokens"]) == 1 and "decision" not in e["guard"] for e in tokens)
    final = events[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert {"risk", "decision", "aborted", "layers", "spans", "probe", "thresholds"} <= set(
        final["guard"]
    )
    assert final["guard"]["spans"] and all(
        0 <= s["start"] < s["end"] and 0 <= s["risk"] <= 1 for s in final["guard"]["spans"]
    )


def test_stream_chunks_show_the_riskiest_final_sentence(make_app: AppFactory) -> None:
    """Each token chunk's ``riskiest_span`` is null or a final sentence: one of the
    verdict's ``spans``, same offsets and risk; the verdict's is the riskiest of them."""
    body = {**CHAT, "max_tokens": 64, "stream": True}
    with (
        TestClient(make_app()) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        events = _events(list(response.iter_lines()))
    final = events[-1]["guard"]
    shown = [e["guard"]["riskiest_span"] for e in events[1:-1]]
    assert all("riskiest_span" in e["guard"] for e in events)
    assert all(span is None or span in final["spans"] for span in shown)
    assert any(span is not None for span in shown), "a sentence was final before the end"
    assert final["riskiest_span"] == max(final["spans"], key=lambda span: span["risk"])


def test_stream_abort_ends_with_content_filter(
    make_app: AppFactory, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    probe = load_probe(write_probe(tmp_path, tiny_model, abort=0.01, abort_min_tokens=2))
    app = make_app(guarded=GuardedModel(tiny_model, probe))
    with TestClient(app) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": True}
        ) as response:
            events = _events(list(response.iter_lines()))
        registry = services_of(app).registry
        assert registry.get_sample_value("hguard_aborts_total") == 1.0
    final = events[-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert final["guard"]["decision"] == "abstain" and final["guard"]["aborted"] is True
    assert len(events) == 1 + 2 + 1  # role, two tokens, verdict


@pytest.mark.parametrize("scope_bias", [-50.0, 50.0])
def test_scope_gate_over_http(
    make_app: AppFactory, tiny_model: LoadedModel, tmp_path: Path, scope_bias: float
) -> None:
    """Out of scope: the answer passes (with its risk), is counted, and every chunk says so;
    in scope the same thresholds abstain."""
    probe = load_probe(
        write_probe(tmp_path, tiny_model, flag=0.0, abstain=0.0, scope_bias=scope_bias)
    )
    app = make_app(guarded=GuardedModel(tiny_model, probe))
    in_scope = scope_bias > 0
    with TestClient(app) as client:
        body = client.post("/v1/chat/completions", json=CHAT).json()
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            events = _events(list(r.iter_lines()))
        registry = services_of(app).registry
        out_of_scope = registry.get_sample_value("hguard_out_of_scope_total")
    assert body["guard"]["scope"]["in_scope"] is in_scope
    assert body["guard"]["risk"] is not None
    assert body["guard"]["decision"] == ("abstain" if in_scope else "pass")
    assert all(e["guard"]["scope"]["in_scope"] is in_scope for e in events[1:])
    assert out_of_scope == (0.0 if in_scope else 2.0)


def test_abstain_replaces_answer_and_is_audited(
    make_app: AppFactory, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    app = make_app(
        flag_threshold=0.0, abstain_threshold=0.0, audit_log=audit, abstain_message="No."
    )
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "a-7"})
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "No."
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert response.headers["x-guard-decision"] == "abstain"
    lines = audit.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["request_id"] == "a-7" and record["decision"] == "abstain"
    assert record["aborted"] is False and record["risk"] == pytest.approx(body["guard"]["risk"])
    assert record["answer"] != "No." and len(record["answer"]) > 0 and "time" in record


def test_auth(make_app: AppFactory) -> None:
    with TestClient(make_app(api_keys="k1,k2")) as client:
        assert _error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer k3"}
        assert client.get("/v1/models", headers=bad).status_code == 401
        ok = client.get("/v1/models", headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200


def test_invalid_requests_are_400(make_app: AppFactory) -> None:
    with TestClient(make_app(max_prompt_tokens=10)) as client:
        missing = _error(client.post("/v1/chat/completions", json={"model": MODEL}), 400)
        assert missing["param"] == "messages"
        assert _error(client.post("/v1/chat/completions", content=b"{not json"), 400)
        too_long = client.post("/v1/chat/completions", json=CHAT)
        assert _error(too_long, 400)["code"] == "context_length_exceeded"
        assert _error(client.post("/v1/completions", json={"model": MODEL, "prompt": []}), 400)
        stops = {**CHAT, "stop": ["a", "b", "c", "d", "e"]}
        assert _error(client.post("/v1/chat/completions", json=stops), 400)
        assert _error(client.get("/v1/nothing"), 404)["type"] == "not_found_error"
        assert _error(client.get("/v1/chat/completions"), 405)


def test_full_queue_is_429_with_retry_after(make_app: AppFactory) -> None:
    app = make_app(queue_size=1, max_batch=1, request_timeout_s=20)
    gate, busy = threading.Event(), threading.Event()

    def block() -> None:
        busy.set()
        gate.wait(30)

    with TestClient(app) as client:
        engine = services_of(app).engine
        assert isinstance(engine, TransformersEngine)
        batcher = engine.batcher
        client.portal.start_task_soon(batcher.run_exclusive, block)  # the worker is busy
        assert busy.wait(10)
        deadline = time.monotonic() + 10
        client.portal.start_task_soon(batcher.run_exclusive, lambda: None)  # the queue is full
        while batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            response = client.post("/v1/chat/completions", json=CHAT)
            assert _error(response, 429)["code"] == "rate_limit_exceeded"
            assert response.headers["retry-after"] == "1"
            registry = services_of(app).registry
            assert registry.get_sample_value("hguard_queue_depth") == 1.0
        finally:
            gate.set()
        deadline = time.monotonic() + 10  # the queued job runs: the queue has room again
        while batcher.depth > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_metrics_values(make_app: AppFactory) -> None:
    app = make_app()
    registry = services_of(app).registry
    with TestClient(app) as client:
        body = client.post("/v1/chat/completions", json=CHAT).json()
        client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
        text = client.get("/metrics").text
    decision = body["guard"]["decision"]
    assert registry.get_sample_value("hguard_decisions_total", {"decision": decision}) == 1.0
    route = {"route": "/v1/chat/completions"}
    assert registry.get_sample_value("hguard_requests_total", {**route, "status": "200"}) == 1.0
    assert registry.get_sample_value("hguard_requests_total", {**route, "status": "404"}) == 1.0
    assert registry.get_sample_value("hguard_generated_tokens_total") == 4.0
    assert registry.get_sample_value("hguard_prompt_tokens_total") == body["usage"]["prompt_tokens"]
    assert registry.get_sample_value("hguard_answer_risk_count") == 1.0
    assert registry.get_sample_value("hguard_time_to_first_token_seconds_count") == 1.0
    assert registry.get_sample_value("hguard_inter_token_latency_seconds_count") == 3.0
    assert registry.get_sample_value("hguard_scoring_seconds_count", {}) >= 1.0
    assert registry.get_sample_value("hguard_batch_size_count") == 1.0
    assert registry.get_sample_value("hguard_requests_in_flight") == 0.0
    assert registry.get_sample_value(
        "hguard_probe_validation_risk_quantile", {"quantile": "0.9"}
    ) == pytest.approx(0.8)
    assert 'hguard_build_info{guarded="true"' in text


def test_score_endpoint(make_app: AppFactory, tiny_guarded: GuardedModel) -> None:
    answer = "Paris, I think. It is the capital of France."
    messages = [*CHAT["messages"], {"role": "assistant", "content": answer}]
    with TestClient(make_app()) as client:
        response = client.post("/v1/guard/score", json={"messages": messages, "model": MODEL})
        by_question = client.post("/v1/guard/score", json={"question": "Q?", "answer": "A"})
        assert _error(client.post("/v1/guard/score", json={"question": "Q?"}), 400)
        assert _error(client.post("/v1/guard/score", json={"messages": messages[:1]}), 400)
    assert response.status_code == 200 and by_question.status_code == 200
    scored = response.json()["guard"]
    assert response.headers["x-guard-decision"] == scored["decision"]
    expected = tiny_guarded.score(messages=messages[:1], answer=answer)
    assert scored["risk"] == pytest.approx(expected.risk, abs=1e-6)
    assert "".join(t["text"] for t in scored["tokens"]) == answer
    assert [answer[s["start"] : s["end"]] for s in scored["spans"]] == [
        "Paris, I think.",
        "It is the capital of France.",
    ]
    for span, want in zip(scored["spans"], expected.spans, strict=True):
        assert span["risk"] == pytest.approx(want.risk, abs=1e-6)
    assert by_question.json()["usage"]["completion_tokens"] == 1


def test_draining_refuses_new_requests(make_app: AppFactory) -> None:
    app = make_app()
    with TestClient(app) as client:
        services_of(app).draining = True
        assert _error(client.post("/v1/chat/completions", json=CHAT), 503)["code"] == (
            "shutting_down"
        )
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_unguarded_mode_says_so(make_app: AppFactory, tiny_model: LoadedModel) -> None:
    app = make_app(guarded=GuardedModel(tiny_model, None))
    with TestClient(app) as client:
        body = client.post("/v1/chat/completions", json=CHAT).json()
        assert client.get("/readyz").json()["guarded"] is False
        assert 'guarded="false"' in client.get("/metrics").text
    assert body["guard"]["guarded"] is False and body["guard"]["risk"] is None


def test_missing_probe_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="GUARD_ALLOW_UNGUARDED"):
        load_guarded(GuardSettings(probe=str(tmp_path / "nothing"), model="smollm2"))
