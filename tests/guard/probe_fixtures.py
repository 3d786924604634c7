"""Write small, valid probe artifacts for a given model: behaviour tests only, never shipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from guard.model import fingerprint_model
from guard.probe import (
    PlattCalibrator,
    ProbeManifest,
    ProbeWeights,
    ScoringRecipe,
    Stacker,
    Thresholds,
    save_probe,
)


def write_probe(
    model: nn.Module,
    directory: Path,
    *,
    neurons: dict[int, list[int]] | None = None,
    stacker: Stacker | None = None,
    flag: float = 0.5,
    abstain: float = 0.8,
    seed: int = 0,
) -> str:
    """A probe with random weights on the given neurons; returns the manifest sha256."""
    rng = np.random.default_rng(seed)
    neurons = neurons or {0: [1, 3], 1: [0, 2, 5]}
    layers = np.concatenate([np.full(len(v), k) for k, v in neurons.items()]).astype(np.int64)
    idx = np.concatenate([np.asarray(v) for v in neurons.values()]).astype(np.int64)
    weights = ProbeWeights(layers, idx, rng.normal(size=idx.size), float(rng.normal()))
    manifest = ProbeManifest(
        name="test-probe",
        model_id="tiny",
        fingerprint=fingerprint_model(model),
        scoring=ScoringRecipe(stacker=stacker, calibrator=PlattCalibrator(a=1.0, b=0.0)),
        thresholds=Thresholds(flag=flag, abstain=abstain),
        validation_risk_quantiles={"0.5": 0.5, "0.9": 0.9},
    )
    return save_probe(directory, manifest, weights, {"report.json": b"{}"})
