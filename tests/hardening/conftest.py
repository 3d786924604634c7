"""Hardening fixtures: the API fixtures (tiny guarded model, live server), a slowed-down
model for timing-sensitive tests, and a tiny model saved on disk for `hguard serve`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from guard.generation import GuardedModel
from guard.model import LoadedModel, load_model
from guard.probe import load_probe
from tests.api.conftest import (  # noqa: F401 - fixtures shared with the API tests
    live_server,
    make_app,
    tiny_guarded,
    tiny_model,
    tiny_probe_dir,
)
from tests.fixtures.models import save_tiny_model, tiny_loaded
from tests.fixtures.probes import write_probe

STEP_SECONDS = 0.02  # a forward pass of the slowed model takes at least this long


def slow_down(model: nn.Module, seconds: float) -> None:
    """Make every forward pass take ``seconds`` longer (so tests can act mid-generation)."""

    def pause(module: nn.Module, args: Any) -> None:
        time.sleep(seconds)

    model.register_forward_pre_hook(pause)


@pytest.fixture(scope="module")
def slow_guarded(tmp_path_factory: pytest.TempPathFactory) -> GuardedModel:
    """A tiny guarded model whose decode steps take ~20 ms each; one per test module, so a
    server still winding down never shares its model with the next module's server."""
    loaded = tiny_loaded()
    slow_down(loaded.model, STEP_SECONDS)
    probe_dir = write_probe(tmp_path_factory.mktemp("slow-probe"), loaded)
    return GuardedModel(loaded, load_probe(probe_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved with ``save_pretrained`` (model and tokenizer)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def disk_probe(tiny_model_loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid probe for the saved tiny model."""
    return write_probe(tmp_path_factory.mktemp("disk-probe"), tiny_model_loaded)


ProbeFactory = Callable[..., Path]


@pytest.fixture
def probe_for(tiny_model_loaded: LoadedModel, tmp_path: Path) -> ProbeFactory:
    """``probe_for(**write_probe_kwargs)``: a fresh probe directory for the saved tiny model."""
    count = 0

    def build(**kwargs: Any) -> Path:
        nonlocal count
        count += 1
        return write_probe(tmp_path / f"probe-{count}", tiny_model_loaded, **kwargs)

    return build
