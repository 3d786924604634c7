"""Real servers on loopback for the live deploy tests: the guard app in a uvicorn thread
(tiny random Llama + planted probe by default), and helpers to wait on HTTP endpoints."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from guard.api.app import create_app
from guard.generation import GuardedModel
from guard.probe import load_probe
from guard.settings import GuardSettings
from tests.guard.tiny_guard import tiny_loaded, write_probe

SERVED_NAME = "tiny-guard"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_ok(url: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the last error after ``timeout_s``."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s: {last}")


def tiny_app(probe_dir: Path | None, **thresholds: Any) -> FastAPI:
    """The real app around a tiny random Llama and a planted probe (validation quantiles
    0.5 -> 0.4 and 0.9 -> 0.8 in its manifest); ``None``: unguarded, no probe.
    ``thresholds`` go to the probe (``flag``, ``abstain``, ``abort``, ``abort_min_tokens``)."""
    loaded = tiny_loaded()
    if probe_dir is not None:
        write_probe(probe_dir, loaded, **{"flag": 0.5, "abstain": 0.8, **thresholds})
    settings = GuardSettings(
        probe=str(probe_dir or "none"), served_model_name=SERVED_NAME, max_new_tokens=24,
        max_batch=4, allow_unguarded=probe_dir is None,
    )  # fmt: skip
    probe = load_probe(probe_dir) if probe_dir is not None else None
    return create_app(settings, guarded=GuardedModel(loaded, probe))


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


@contextmanager
def serve(app: FastAPI, ready_path: str = "/readyz", timeout_s: float = 60) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields the base URL; always stops."""
    port = free_port()
    server = _ThreadServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"guard-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(base + ready_path, timeout_s)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
