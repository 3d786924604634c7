"""Metrics on known inputs, the evaluation report's contract, and ``probes evaluate`` e2e."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guard.probe import STAT_NAMES, load_probe
from probes.build import BuildConfig, build
from probes.evaluate import EvaluateConfig, ScoredAnswers, build_report, evaluate_probe
from probes.metrics import (
    BASELINE_SIGNS,
    auroc,
    auroc_ci95,
    expected_calibration_error,
    length_controlled,
    paired_auroc_difference,
    risk_coverage,
    score_metrics,
)
from tests.probes.tiny_pipeline import tiny_build_config


def test_auroc_on_known_orderings() -> None:
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auroc(y, np.zeros(4)) == 0.5
    assert auroc(y, np.array([0.1, 0.3, 0.2, 0.4])) == 0.75
    assert np.isnan(auroc(np.ones(4), np.arange(4.0)))


def test_ece_on_known_inputs() -> None:
    y = np.array([0, 1] * 50)
    assert expected_calibration_error(y, np.full(100, 0.5)) == pytest.approx(0.0)
    assert expected_calibration_error(np.ones(10), np.full(10, 0.9)) == pytest.approx(0.1)
    # two bins: 0.15 predicted vs 0.0 observed, 0.95 predicted vs 1.0 observed, equal weight
    probs = np.array([0.15] * 10 + [0.95] * 10)
    labels = np.array([0] * 10 + [1] * 10)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.5 * 0.15 + 0.5 * 0.05)


def test_bootstrap_interval_contains_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    s = y + rng.normal(size=400)
    lo, hi = auroc_ci95(y, s, n_boot=300)
    assert lo < auroc(y, s) < hi
    assert hi - lo < 0.2


def test_paired_difference_of_a_score_with_itself_is_zero() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.5).astype(int)
    s = y + rng.normal(size=200)
    same = paired_auroc_difference(y, s, s, n_boot=100)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    better = paired_auroc_difference(y, s, rng.normal(size=200), n_boot=200)
    assert better["ci95"][0] > 0


def test_risk_coverage_of_a_perfect_score() -> None:
    y = np.array([0] * 8 + [1] * 2)
    rc = risk_coverage(y, y.astype(float), points=10)
    assert [p["risk"] for p in rc["curve"][:8]] == [0.0] * 8
    assert rc["curve"][-1] == {"coverage": 1.0, "risk": 0.2}


def test_length_controlled_sees_through_a_pure_length_score() -> None:
    rng = np.random.default_rng(2)
    length = rng.integers(1, 20, size=1000).astype(float)
    y = (rng.random(1000) < length / 25).astype(int)  # longer answers are wrong more often
    check = length_controlled(y, length, length)
    assert auroc(y, length) > 0.6
    assert check["weighted_auroc"] < 0.6


def _scored(n: int = 500, seed: int = 0) -> ScoredAnswers:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.8).astype(np.int64)
    stats = {name: rng.normal(size=n) for name in STAT_NAMES}
    stats["mean_logprob"] = -1.5 * y + rng.normal(size=n)  # lower when hallucinated
    stats["max_entropy"] = 1.0 * y + rng.normal(size=n)
    stats["length"] = rng.integers(1, 20, size=n).astype(float)
    logit = 2 * y + rng.normal(size=n)
    risk = 1 / (1 + np.exp(-logit))
    return ScoredAnswers(y, risk, logit, logit, stats)


def test_baselines_are_oriented_higher_means_hallucination(
    tiny_probe: tuple[BuildConfig, str],
) -> None:
    assert BASELINE_SIGNS == {
        "length": 1.0,
        "mean_logprob": -1.0,
        "min_logprob": -1.0,
        "mean_entropy": 1.0,
        "max_entropy": 1.0,
    }
    scored = _scored()
    report = build_report(scored, load_probe(tiny_probe[0].out))
    assert report["metrics"]["mean_logprob"]["auroc"] > 0.75
    assert report["metrics"]["max_entropy"]["auroc"] > 0.65
    assert report["best_baseline"] == "mean_logprob"


def test_report_contract(tiny_probe: tuple[BuildConfig, str]) -> None:
    report = build_report(_scored(), load_probe(tiny_probe[0].out))
    assert report["n"] == 500 and 0 < report["hallucinated"] < 500
    for name in ("probe", "cett_only", *BASELINE_SIGNS):
        metrics = report["metrics"][name]
        lo, hi = metrics["auroc_ci95"]
        assert lo <= metrics["auroc"] <= hi
        assert "auprc" in metrics and "risk_coverage" in metrics
    assert {"brier", "ece", "reliability"} <= set(report["metrics"]["probe"])
    assert "ece" not in report["metrics"]["length"]  # not a probability
    diff = report["served_minus_best_baseline"]
    assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1]
    assert {"flag", "abstain"} == set(report["thresholds"])
    json.dumps(report, allow_nan=False)


def test_score_metrics_refuses_nan_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        score_metrics(np.array([0, 1]), np.array([0.1, np.nan]), calibrated=False)


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildConfig, str]:
    """A real artifact for a tiny random model (its thresholds and stacker feed the report)."""
    config = tiny_build_config(tmp_path_factory.mktemp("tiny_eval"))
    return config, build(config.model_copy(update={"sparsity_curve": False}))


@pytest.mark.parametrize("split", ["all", "test"])
def test_evaluate_cli_contract_on_a_tiny_model(
    tiny_probe: tuple[BuildConfig, str], tmp_path: Path, split: str
) -> None:
    config, sha = tiny_probe
    out = tmp_path / "eval" / "report.json"
    report = evaluate_probe(
        EvaluateConfig(
            probe=str(config.out), dataset=config.dataset, out=out, split=split, limit=40
        )
    )
    written = json.loads(out.read_text())
    assert written["n"] == report["n"] > 0
    assert written["questions"] <= 40
    assert written["probe"]["sha256"] == sha
    for name in ("probe", "length", "mean_logprob", "min_logprob", "mean_entropy", "max_entropy"):
        assert "auroc" in written["metrics"][name]
        assert "auroc_ci95" in written["metrics"][name]
    assert (out.parent / "report.h_neurons.png").is_file()
