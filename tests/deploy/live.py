"""The guard app the live deploy tests serve (with `tests.fixtures.servers.serve_in_thread`):
a tiny random Llama and a planted probe by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from guard.generation import GuardedModel
from guard.probe import load_probe
from tests.fixtures.models import tiny_loaded
from tests.fixtures.probes import write_probe
from tests.fixtures.servers import guard_app

SERVED_NAME = "tiny-guard"


def tiny_app(probe_dir: Path | None, *, max_new_tokens: int = 24, **thresholds: Any) -> FastAPI:
    """The real app around a tiny random Llama and a planted probe (validation quantiles
    0.5 -> 0.4 and 0.9 -> 0.8 in its manifest); ``None``: unguarded, no probe.
    ``thresholds`` go to `write_probe` (``flag``, ``abstain``, ``abort``, ``scope_bias``...)."""
    loaded = tiny_loaded()
    if probe_dir is not None:
        write_probe(probe_dir, loaded, **thresholds)
    probe = load_probe(probe_dir) if probe_dir is not None else None
    return guard_app(
        GuardedModel(loaded, probe), probe=str(probe_dir or "none"),
        served_model_name=SERVED_NAME, max_new_tokens=max_new_tokens, max_batch=4,
        allow_unguarded=probe_dir is None,
    )  # fmt: skip
