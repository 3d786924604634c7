"""SIGTERM while streams are in flight: new requests get 503, the streams finish, the process
exits 0 within GUARD_SHUTDOWN_GRACE_S, and the audit log holds only whole lines."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.servers import ServerProcess, hguard_serve, running, sse_events

SERVED = "tiny"
STREAMS = 4
# Uvicorn's 1 s task cancellation, lifespan shutdown and interpreter exit come after the grace
# period: ~2 s on an idle machine; generous here because CI shares two busy cores.
EXIT_SLACK_S = 60.0
CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "Tell me a story."}]}


@dataclass
class StreamClient:
    """One streaming request read slowly in a thread (a slow client keeps it in flight)."""

    url: str
    max_tokens: int
    read_delay_s: float
    first_token: threading.Event = field(default_factory=threading.Event)
    hurry: threading.Event = field(default_factory=threading.Event)  # stop reading slowly
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    finished_at: float | None = None

    def run(self) -> None:
        body = {**CHAT, "stream": True, "max_tokens": self.max_tokens, "temperature": 0}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                              timeout=120) as response:  # fmt: skip
                response.raise_for_status()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    for chunk in sse_events(iter([line])):
                        self.chunks.append(chunk)
                        if chunk["guard"].get("tokens"):
                            self.first_token.set()
                        if not self.hurry.is_set():
                            time.sleep(self.read_delay_s)
        except Exception as exc:  # reported by the test
            self.error = repr(exc)
        finally:
            self.finished_at = time.monotonic()
            self.first_token.set()

    @property
    def finish_reason(self) -> str | None:
        finals = [c["choices"][0]["finish_reason"] for c in self.chunks if c.get("choices")]
        return next((f for f in finals if f), None)


def _start_streams(url: str, max_tokens: int, read_delay_s: float) -> list[StreamClient]:
    clients = [StreamClient(url, max_tokens, read_delay_s) for _ in range(STREAMS)]
    for client in clients:
        threading.Thread(target=client.run, daemon=True).start()
    for client in clients:
        assert client.first_token.wait(300), "no stream produced a token"
    assert all(c.error is None for c in clients), [c.error for c in clients]
    return clients


def _serve(
    tiny_model_dir: Path, probe: Path, tmp_path: Path, grace_s: float, max_new_tokens: int = 400
) -> ServerProcess:
    server = hguard_serve(
        tiny_model_dir, probe, tmp_path / "serve.log", served_model_name=SERVED,
        max_new_tokens=max_new_tokens, shutdown_grace_s=grace_s, audit_log=tmp_path / "audit.jsonl",
        flag_threshold=0.0, abstain_threshold=1.0,  # every answer flagged: every one audited
    )  # fmt: skip
    return server


def _whole_lines(audit: Path) -> list[dict[str, Any]]:
    data = audit.read_bytes() if audit.exists() else b""
    assert not data or data.endswith(b"\n"), "the audit log ends in a partial line"
    return [json.loads(line) for line in data.decode().splitlines()]


def test_sigterm_drains_streams_refuses_new_requests_and_exits_0(
    tiny_model_dir: Path, disk_probe: Path, tmp_path: Path
) -> None:
    grace_s = 60.0
    with running(_serve(tiny_model_dir, disk_probe, tmp_path, grace_s)) as server:
        server.wait_ready()
        url = server.base_url
        clients = _start_streams(url, max_tokens=300, read_delay_s=0.01)
        signalled = time.monotonic()
        server.terminate()
        time.sleep(0.3)
        refused = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2},
                             timeout=30)  # fmt: skip
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        in_flight = sum(c.finished_at is None for c in clients)
        assert in_flight > 0, "the streams ended before the signal: nothing was drained"
        code = server.proc.wait(grace_s + EXIT_SLACK_S)
        exited = time.monotonic() - signalled
        assert code == 0, server.log_text()
        assert exited < grace_s + EXIT_SLACK_S
    for client in clients:  # what the server sent before it exited is still being read
        client.hurry.set()
    deadline = time.monotonic() + 30
    while any(c.finished_at is None for c in clients) and time.monotonic() < deadline:
        time.sleep(0.05)
    for client in clients:
        assert client.error is None and client.done, client.error
        assert client.finish_reason in ("length", "stop", "content_filter")
        assert client.chunks[-1]["guard"]["decision"] == "flag"
    audit = _whole_lines(tmp_path / "audit.jsonl")
    assert len(audit) == STREAMS and {a["decision"] for a in audit} == {"flag"}
    assert len({a["request_id"] for a in audit}) == STREAMS


def test_grace_period_bounds_the_drain(
    tiny_model_dir: Path, disk_probe: Path, tmp_path: Path
) -> None:
    """Streams slower than the grace period do not hold the process: it exits 0 after it.

    The streams are long (4,000 tokens, read slowly) so that they outlast the grace period
    even when generation is fast: 300 tokens of the tiny model can all be generated and
    buffered in the socket within 2 s, and then an early exit is correct."""
    grace_s, tokens = 2.0, 4000
    with running(_serve(tiny_model_dir, disk_probe, tmp_path, grace_s, tokens)) as server:
        server.wait_ready()
        clients = _start_streams(server.base_url, max_tokens=tokens, read_delay_s=0.2)
        signalled = time.monotonic()
        server.terminate()
        code = server.proc.wait(grace_s + EXIT_SLACK_S)
        exited = time.monotonic() - signalled
        assert code == 0, server.log_text()
        assert grace_s * 0.9 <= exited < grace_s + EXIT_SLACK_S, exited
    for client in clients:  # what the server sent before it exited is still buffered
        client.hurry.set()
    deadline = time.monotonic() + 30
    while any(c.finished_at is None for c in clients) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(c.finished_at is not None for c in clients), "a client hangs after the exit"
    assert any(not c.done for c in clients), "every stream finished within the grace period"
    _whole_lines(tmp_path / "audit.jsonl")
