"""Helpers of the hardening tests: a tiny model on disk, `hguard serve` as a subprocess,
Prometheus samples, OpenAI's error shape.

Every process started here runs on loopback, under a deadline, and is killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import free_port
from tests.guard.tiny_guard import tiny_loaded

HGUARD = Path(sys.executable).with_name("hguard")
REPO = Path(__file__).resolve().parents[2]


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """The tiny random Llama and its byte-level tokenizer, saved like a Hugging Face model."""
    loaded = tiny_loaded(seed)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def is_openai_error(body: Any) -> bool:
    """``{"error": {"message": str, "type": str, "param": str|None, "code": str|None}}``."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    error = body["error"]
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error["message"].strip())
        and isinstance(error.get("type"), str)
        and all(isinstance(error.get(k), str | None) for k in ("param", "code"))
    )


def sample(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """One sample of the Prometheus text exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(s.value)
    return None


def server_env(**settings: Any) -> dict[str, str]:
    """The environment of a server subprocess: GUARD_* from ``settings``, offline, no GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env.update({f"GUARD_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@dataclass
class ServerProcess:
    """A running ``hguard serve``; stderr goes to ``log`` (read it with `log_text`)."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"hguard serve exited {code}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hguard serve not ready in {timeout} s:\n{self.log_text()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text


def hguard_serve(
    model: Path | str, probe: Path | str, log: Path, port: int | None = None, **settings: Any
) -> ServerProcess:
    """Start ``hguard serve --model M --probe P`` on a free loopback port (not yet ready)."""
    port = port or free_port()
    args = [str(HGUARD), "serve", "--model", str(model), "--probe", str(probe)]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            args, stdout=sink, stderr=subprocess.STDOUT, env=server_env(**settings), cwd=REPO
        )
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log)


@contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Yield the server; always stop it (SIGKILL after 10 s) when the block ends."""
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(10)


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """The JSON payloads of an SSE stream, stopping at ``[DONE]``."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        yield json.loads(data)


@contextmanager
def serve_in_thread(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yield its URL."""
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
