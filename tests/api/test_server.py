"""`hguard serve` as a process: refuses a missing probe, drains on SIGTERM and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import free_port
from tests.guard.tiny_guard import tiny_loaded, write_probe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a local Hugging Face directory (a valid ``--model`` spec)."""
    directory = tmp_path_factory.mktemp("tiny-model")
    loaded = tiny_loaded()
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def _serve(model_dir: Path, probe: Path, port: int, **env: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "guard.cli", "serve", "--model", str(model_dir),
               "--probe", str(probe), "--port", str(port)]  # fmt: skip
    environment = {**os.environ, "GUARD_SERVED_MODEL_NAME": "tiny", **env}
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    from guard.model import load_model

    probe = write_probe(tmp_path / "probe", load_model(str(model_dir)))
    port = free_port()
    process = _serve(model_dir, probe, port, GUARD_SHUTDOWN_GRACE_S="60",
                     GUARD_MAX_NEW_TOKENS="450")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a slow, shared CI machine: imports alone take a while
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not become ready: {process.communicate()[0][-2000:]}")
        time.sleep(0.2)
    yield process, base
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_drains_in_flight_requests_and_exits_zero(
    server: tuple[subprocess.Popen[str], str],
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
    process = _serve(model_dir, tmp_path / "no-probe", free_port())
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "GUARD_ALLOW_UNGUARDED" in output and "no probe" in output
