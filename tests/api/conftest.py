"""API fixtures: a tiny guarded model, app factories, and a live uvicorn server on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from guard.generation import GuardedModel
from guard.model import LoadedModel
from guard.probe import load_probe
from tests.fixtures.models import tiny_loaded
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import AppFactory, LiveServer, guard_app, serve_in_thread


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture(scope="session")
def tiny_probe_dir(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probe(tmp_path_factory.mktemp("probe"), tiny_model)


@pytest.fixture(scope="session")
def tiny_guarded(tiny_model: LoadedModel, tiny_probe_dir: Path) -> GuardedModel:
    return GuardedModel(tiny_model, load_probe(tiny_probe_dir))


@pytest.fixture
def make_app(tiny_guarded: GuardedModel) -> AppFactory:
    """``make_app(guarded=None, **settings)``: a fresh app and registry around the tiny model
    (or ``guarded``'s pieces), configured by the settings."""

    def build(guarded: GuardedModel | None = None, **overrides: Any) -> FastAPI:
        return guard_app(guarded or tiny_guarded, **overrides)

    return build


@pytest.fixture
def live_server(make_app: AppFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start ``make_app(**settings)`` under uvicorn on a free loopback port (a thread)."""
    with ExitStack() as servers:

        def start(**overrides: Any) -> LiveServer:
            app = make_app(**overrides)
            return LiveServer(app, servers.enter_context(serve_in_thread(app)))

        yield start
