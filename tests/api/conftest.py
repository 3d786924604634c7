"""API fixtures: a tiny guarded model, app factories, and a live uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from guard.api.app import create_app
from guard.api.deps import Services
from guard.generation import GuardedModel
from guard.loading import configured
from guard.model import LoadedModel
from guard.probe import load_probe
from guard.settings import GuardSettings
from tests.guard.tiny_guard import TINY_MODEL_ID, tiny_loaded, write_probe

MODEL = TINY_MODEL_ID


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture(scope="session")
def tiny_probe_dir(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probe(tmp_path_factory.mktemp("probe"), tiny_model)


@pytest.fixture(scope="session")
def tiny_guarded(tiny_model: LoadedModel, tiny_probe_dir: Path) -> GuardedModel:
    return GuardedModel(tiny_model, load_probe(tiny_probe_dir))


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(tiny_guarded: GuardedModel) -> AppFactory:
    """``make_app(guarded=None, **settings)``: a fresh app and registry around the tiny model
    (or ``guarded``'s pieces), configured by the settings."""

    def build(guarded: GuardedModel | None = None, **overrides: Any) -> FastAPI:
        settings = GuardSettings(**{"max_new_tokens": 64, **overrides})
        base = guarded or tiny_guarded
        model = configured(base.loaded, base.probe, settings)
        return create_app(settings, guarded=model, registry=CollectorRegistry())

    return build


def services_of(app: FastAPI) -> Services:
    services = app.state.services
    assert isinstance(services, Services)
    return services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    app: FastAPI
    base_url: str

    @property
    def services(self) -> Services:
        return services_of(self.app)


@pytest.fixture
def live_server(make_app: AppFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start ``make_app(**settings)`` under uvicorn on a free loopback port (a thread)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> LiveServer:
        app = make_app(**overrides)
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        servers.append((server, thread))
        return LiveServer(app, f"http://127.0.0.1:{port}")

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)
