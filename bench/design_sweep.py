"""Design sweep of the served score: which recipe wins in domain *and* out of domain.

Trains each candidate `TrainConfig` on a build's TriviaQA feature store (train split,
calibrated on its validation split) and measures the served score, its CETT part and
calibration on the validation split and on an out-of-domain store (NQ-open dev answers
extracted with the same model), plus the free baselines and the AUROC-vs-sparsity curve
of L1 probes. The test split is never looked at here.

    python bench/design_sweep.py --triviaqa runs/full-work --ood runs/nq-work \
        --out bench/results/design_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from guard.fingerprint import ModelFingerprint
from guard.probe import Probe
from probes.assemble import assemble_probe, train_served_probe
from probes.build import BuildConfig
from probes.calibration import apply_stacker, fit_stacker, stats_matrix
from probes.evaluate import score_store
from probes.extract import FeatureStore
from probes.metrics import BASELINE_SIGNS, auroc, expected_calibration_error
from probes.train import TrainConfig, labels_of, sparsity_curve, split_rows

GRID = [0.005, 0.01, 0.02, 0.05, 0.1]
L2_GRID = [0.001, 0.003, 0.01]
CANDIDATES: dict[str, TrainConfig] = {
    "l1_cv_stack (shipped)": TrainConfig(),
    "l1_cv_nostack": TrainConfig(stacker=False),
    "l1_c0.02_stack": TrainConfig(c_grid=[0.02]),
    "l1_cv_stack_maxent_minlp": TrainConfig(stacker_stats=["max_entropy", "min_logprob"]),
    "l2_cv_stack": TrainConfig(penalty="l2", c_grid=L2_GRID),
    "l2_cv_nostack": TrainConfig(penalty="l2", c_grid=L2_GRID, stacker=False),
    "hybrid_l2": TrainConfig(penalty="l2", c_grid=L2_GRID, features="hybrid"),
    "l1_cv_stack_3v1": TrainConfig(mode="3-vs-1"),
}
SPARSITY_C = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]


def baselines(tqa: FeatureStore, val: np.ndarray, ood: FeatureStore, rows: np.ndarray) -> dict:
    out: dict[str, Any] = {}
    for name, sign in BASELINE_SIGNS.items():
        out[name] = {
            "val": auroc(labels_of(tqa, val), sign * tqa.meta[name][val]),
            "ood": auroc(labels_of(ood, rows), sign * ood.meta[name][rows]),
        }
    train = split_rows(tqa, "train")
    stack = fit_stacker(None, stats_matrix(tqa.meta, train), labels_of(tqa, train))
    out["stats_only_stack"] = {
        tag: auroc(
            labels_of(store, r), apply_stacker(stack, np.zeros(r.size), stats_matrix(store.meta, r))
        )
        for tag, store, r in (("val", tqa, val), ("ood", ood, rows))
    }
    return out


def measure(name: str, config: TrainConfig, tqa: FeatureStore, targets: dict) -> dict[str, Any]:
    """Train one candidate and score it on every target with the runtime's RiskScorer."""
    started = time.perf_counter()
    trained = train_served_probe(tqa, config)
    fingerprint = ModelFingerprint(
        architecture="sweep", num_layers=tqa.num_layers, mlp_width=tqa.width, down_proj_sha256="-"
    )
    loaded = SimpleNamespace(model_id="sweep", fingerprint=fingerprint)
    build = BuildConfig(dataset=Path(sys.argv[0]), out=Path("unused"))
    manifest = assemble_probe(trained, loaded, tqa, build, name)
    probe = Probe(manifest, trained.weights, Path("."), "")
    row: dict[str, Any] = {"C": trained.fit.c, "neurons": int(trained.weights.weights.size)}
    for tag, (store, rows) in targets.items():
        scored = score_store(probe, store, rows)
        row[tag] = {
            "served": auroc(scored.labels, scored.risk),
            "cett_only": auroc(scored.labels, scored.probe_logit),
            "ece": expected_calibration_error(scored.labels, scored.risk),
        }
    row["secs"] = round(time.perf_counter() - started, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triviaqa", required=True, type=Path, help="build work dir or store")
    parser.add_argument("--ood", required=True, type=Path, help="out-of-domain feature store")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    tqa, ood = FeatureStore(args.triviaqa), FeatureStore(args.ood)
    val = split_rows(tqa, "val")
    ood_rows = np.flatnonzero(np.asarray(ood.meta["length"]) > 0)
    targets = {"val": (tqa, val), "ood": (ood, ood_rows)}
    result: dict[str, Any] = {"baselines": baselines(tqa, val, ood, ood_rows), "candidates": {}}
    for name, config in CANDIDATES.items():
        result["candidates"][name] = measure(name, config, tqa, targets)
        print(name, json.dumps(result["candidates"][name]), flush=True)
    result["sparsity"] = sparsity_curve(tqa, TrainConfig(), SPARSITY_C, targets)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
