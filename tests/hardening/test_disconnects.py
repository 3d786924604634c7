"""Clients that drop mid-stream: generation stops within a few tokens, and the in-flight gauge,
the queue and the batch rows all return to zero (many drops, several at once)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from guard.api.app import create_app
from guard.generation import GuardedModel
from guard.settings import GuardSettings
from tests.fixtures.models import TINY_MODEL_ID as MODEL
from tests.fixtures.servers import serve_in_thread, sse_events
from tests.hardening.helpers import sample

MAX_TOKENS = 150  # ~3 s per stream at the slowed model's 20 ms per step
DROPS = 24
AT_ONCE = 8
READ_BEFORE_DROP = 3
SLACK_TOKENS = 8  # a drop is noticed within a few steps (plus what was already in flight)


@pytest.fixture(scope="module")
def server(slow_guarded: GuardedModel) -> Iterator[tuple[str, CollectorRegistry]]:
    registry = CollectorRegistry()
    settings = GuardSettings(max_new_tokens=MAX_TOKENS, max_batch=AT_ONCE, batch_wait_ms=20)
    app = create_app(settings, guarded=slow_guarded, registry=registry)
    with serve_in_thread(app) as url:
        yield url, registry


def _drop_after(url: str, tokens: int, read: list[int]) -> None:
    # Greedy: a sampled answer of the random model can end on its first token.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0}  # fmt: skip
    seen = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for chunk in sse_events(response.iter_lines()):
            seen += len(chunk["guard"].get("tokens") or [])
            if seen >= tokens:
                break  # leaving the block closes the connection mid-stream
    read.append(seen)


def _settled(registry: CollectorRegistry, timeout: float = 30.0) -> float:
    """Wait until no tokens are generated for a while; the generated-token count then."""
    deadline = time.monotonic() + timeout
    last, quiet_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        now = registry.get_sample_value("hguard_generated_tokens_total") or 0.0
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since > 1.0:
            return now
        time.sleep(0.1)
    raise AssertionError("generation did not stop after the clients went away")


def test_dropped_streams_stop_generating_and_free_everything(
    server: tuple[str, CollectorRegistry],
) -> None:
    url, registry = server
    before = _settled(registry)
    read: list[int] = []
    for _ in range(DROPS // AT_ONCE):
        threads = [
            threading.Thread(target=_drop_after, args=(url, READ_BEFORE_DROP, read))
            for _ in range(AT_ONCE)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(read) == DROPS and min(read) >= READ_BEFORE_DROP
    generated = _settled(registry) - before
    assert generated <= sum(read) + SLACK_TOKENS * DROPS, (
        f"{generated:.0f} tokens generated for {DROPS} streams dropped after ~{READ_BEFORE_DROP}"
    )
    assert generated < DROPS * MAX_TOKENS / 4  # far from running every stream to the end
    assert registry.get_sample_value("hguard_requests_in_flight") == 0
    assert registry.get_sample_value("hguard_queue_depth") == 0
    assert (registry.get_sample_value("hguard_decisions_total", {"decision": "pass"}) or 0) + (
        registry.get_sample_value("hguard_decisions_total", {"decision": "flag"}) or 0
    ) + (registry.get_sample_value("hguard_decisions_total", {"decision": "abstain"}) or 0) == 0
    # No row is left decoding: a 2-token request is the only thing generated now.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "temperature": 0}  # fmt: skip
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    assert _settled(registry) - before - generated == 2
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert sample(metrics, "hguard_requests_in_flight") == 0


def test_abandoned_non_streamed_request_frees_its_row(
    server: tuple[str, CollectorRegistry],
) -> None:
    """A client that hangs up on a non-streamed request stops its generation within a few
    steps (the server polls for the disconnect) and leaves nothing behind."""
    url, registry = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS, "temperature": 0}  # fmt: skip
    tokens_before = _settled(registry)
    before = _chat_requests(registry)
    # A raw socket that sends the request and hangs up without reading: the client always
    # gives up first (a read timeout raced sampled answers that end early).
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: guard\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while _chat_requests(registry) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _chat_requests(registry) == before + 1, "the abandoned request was never served"
    deadline = time.monotonic() + 60
    while registry.get_sample_value("hguard_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert registry.get_sample_value("hguard_requests_in_flight") == 0
    generated = _settled(registry) - tokens_before
    assert generated < MAX_TOKENS / 2, f"{generated:.0f} of {MAX_TOKENS} tokens after the hang-up"
    assert registry.get_sample_value("hguard_queue_depth") == 0


def _chat_requests(registry: CollectorRegistry) -> float:
    """Chat completion requests answered so far, whatever their status."""
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "hguard_requests"
        for sample in metric.samples
        if sample.name == "hguard_requests_total"
        and sample.labels.get("route") == "/v1/chat/completions"
    )
