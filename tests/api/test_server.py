"""`hguard serve` as a process: refuses a missing probe, drains on SIGTERM and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.models import save_tiny_model
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import hguard_serve, running


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a local Hugging Face directory (a valid ``--model`` spec)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    from guard.model import load_model

    probe = write_probe(tmp_path / "probe", load_model(str(model_dir)))
    serving = hguard_serve(model_dir, probe, tmp_path / "serve.log", served_model_name="tiny",
                           shutdown_grace_s=60, max_new_tokens=450)  # fmt: skip
    with running(serving):
        serving.wait_ready(600)  # a slow, shared CI machine: imports alone take a while
        yield serving.proc, serving.base_url


def test_sigterm_drains_in_flight_requests_and_exits_zero(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    """New requests get 503 while an in-flight stream keeps going; the process exits 0."""
    process, base = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 450, "temperature": 0, "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=base, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as stream,
    ):
        events = (line for line in stream.iter_lines() if line.startswith("data: "))
        assert json.loads(next(events)[6:])["object"] == "chat.completion.chunk"
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 503:  # the drain has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = client.post("/v1/chat/completions", json={**body, "stream": False})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        more = [next(events) for _ in range(5)]  # the in-flight stream still flows
        assert all(json.loads(line[6:])["guard"]["tokens"] for line in more)
    # leaving the block disconnects: the server frees the row and finishes draining
    assert process.wait(90) == 0


def test_missing_probe_fails_startup_with_a_clear_message(model_dir: Path, tmp_path: Path) -> None:
    server = hguard_serve(model_dir, tmp_path / "no-probe", tmp_path / "serve.log")
    with running(server):
        server.proc.wait(120)
    output = server.log_text()
    assert server.proc.returncode != 0
    assert "GUARD_ALLOW_UNGUARDED" in output and "no probe" in output
