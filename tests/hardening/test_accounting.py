"""Determinism and accounting: after a mixed run (chat and text, streamed and not, scoring,
aborts, refusals), every answered request has exactly one decision in the metrics and, when
flagged or abstained, exactly one audit line with the same decision."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from guard.api.app import create_app
from guard.decoding import SamplingParams
from guard.generation import GuardedModel
from guard.loading import configured
from guard.settings import GuardSettings
from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.servers import serve_in_thread, sse_events

REQUESTS = 90
MAX_TOKENS = 6
ROUTES = ("chat", "chat-stream", "text", "text-stream", "score", "bad")


def _question(i: int) -> str:
    return f"Question {i}: who wrote {'abcdefghij'[i % 10] * (1 + i % 4)}?"


def _tertile_thresholds(guarded: GuardedModel) -> tuple[float, float]:
    """Flag and abstain thresholds that split this probe's risks on our questions in three."""
    risks = sorted(
        r
        for i in range(30)
        if (r := guarded.generate(
            guarded.encode_chat([{"role": "user", "content": _question(i)}]),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        ).risk) is not None
    )  # fmt: skip
    n = len(risks)
    flag = (risks[n // 3 - 1] + risks[n // 3]) / 2
    abstain = (risks[2 * n // 3 - 1] + risks[2 * n // 3]) / 2
    if not risks[0] < flag < abstain < risks[-1]:
        raise RuntimeError(f"the fixture probe's risks do not spread: {risks}")
    return flag, abstain


@pytest.fixture(scope="module")
def audited(
    tiny_guarded: GuardedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, CollectorRegistry, Path]]:
    flag, abstain = _tertile_thresholds(tiny_guarded)
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    settings = GuardSettings(
        max_new_tokens=MAX_TOKENS, flag_threshold=flag, abstain_threshold=abstain,
        abort_threshold=abstain, abort_min_tokens=2, audit_log=audit, max_batch=8,
    )  # fmt: skip
    registry = CollectorRegistry()
    guarded = configured(tiny_guarded.loaded, tiny_guarded.probe, settings)
    app = create_app(settings, guarded=guarded, registry=registry)
    with serve_in_thread(app) as url:
        yield url, registry, audit


@dataclass(frozen=True)
class Answer:
    request_id: str
    status: int
    decision: str | None  # None: not answered (refused)
    aborted: bool = False


def _call(client: httpx.Client, i: int) -> Answer:
    route = ROUTES[i % len(ROUTES)]
    question = _question(i)
    messages = [{"role": "user", "content": question}]
    common = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0}
    if route == "score":
        response = client.post("/v1/guard/score", json={"question": question, "answer": "Bob"})
        return _final(response, response.json().get("guard"))
    if route == "bad":
        response = client.post("/v1/chat/completions", json={**common, "messages": [], "n": 2})
        return Answer(response.headers["x-request-id"], response.status_code, None)
    path = "/v1/chat/completions" if route.startswith("chat") else "/v1/completions"
    body = {**common, "messages": messages} if route.startswith("chat") else {
        **common, "prompt": question}  # fmt: skip
    if not route.endswith("stream"):
        response = client.post(path, json=body)
        return _final(response, response.json().get("guard"))
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        chunks = list(sse_events(response.iter_lines()))
        finals = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1, chunks
        return _final(response, finals[0]["guard"])


def _final(response: httpx.Response, guard: dict[str, Any] | None) -> Answer:
    assert response.status_code == 200 and guard is not None, response.text
    return Answer(
        response.headers["x-request-id"], 200, guard["decision"], bool(guard.get("aborted"))
    )


def _audit_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def test_every_answer_has_one_decision_and_one_audit_line(
    audited: tuple[str, CollectorRegistry, Path],
) -> None:
    url, registry, audit = audited
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _call(client, i), range(REQUESTS)))
    answered = [a for a in answers if a.decision is not None]
    decisions = Counter(a.decision for a in answered)
    assert set(decisions) == {"pass", "flag", "abstain"}, decisions  # all three occur
    assert len({a.request_id for a in answers}) == REQUESTS  # ids are unique
    for decision in ("pass", "flag", "abstain"):
        counted = registry.get_sample_value("hguard_decisions_total", {"decision": decision})
        assert counted == decisions[decision], (decision, counted, decisions)
    assert registry.get_sample_value("hguard_answer_risk_count") == len(answered)
    assert registry.get_sample_value("hguard_aborts_total") == sum(a.aborted for a in answered)
    lines = _audit_lines(audit)
    per_id = Counter(line["request_id"] for line in lines)
    assert max(per_id.values(), default=1) == 1, "an answer was audited twice"
    expected = {a.request_id: a.decision for a in answered if a.decision != "pass"}
    assert {line["request_id"]: line["decision"] for line in lines} == expected
    refused = [a for a in answers if a.decision is None]
    assert refused and all(a.status == 400 for a in refused)
    assert not {a.request_id for a in refused} & set(per_id)


def test_same_request_same_verdict(audited: tuple[str, CollectorRegistry, Path]) -> None:
    """Greedy decoding is deterministic: the same request gets the same answer and risk,
    streamed or not, alone or in a batch."""
    url, _, _ = audited
    body = {"model": MODEL, "messages": [{"role": "user", "content": _question(7)}],
            "max_tokens": MAX_TOKENS, "temperature": 0}  # fmt: skip
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(8)))
    guards = [r.json()["guard"] for r in results]
    texts = {r.json()["choices"][0]["message"]["content"] for r in results}
    assert len(texts) == 1 and len({g["decision"] for g in guards}) == 1
    risks = [g["risk"] for g in guards]
    assert max(risks) - min(risks) < 1e-4, risks
