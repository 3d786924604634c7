"""Fixtures of the guard tests: SmolLM2 under a probe."""

from __future__ import annotations

import pytest

from guard.errors import ProbeError
from guard.generation import GuardedModel
from guard.model import LoadedModel
from guard.probe import load_probe
from tests.fixtures.probes import write_probe


@pytest.fixture(scope="session")
def smol_guarded(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> GuardedModel:
    """SmolLM2 with the shipped probe when there is one, else a fixed few-neuron test probe."""
    try:
        probe = load_probe("default")
        probe.verify_model(smollm2.fingerprint)
    except ProbeError:
        probe = load_probe(write_probe(tmp_path_factory.mktemp("smol-probe"), smollm2))
    return GuardedModel(smollm2, probe)
