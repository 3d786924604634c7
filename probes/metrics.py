"""Metrics of a hallucination score against labels (1 = hallucinated), with intervals.

Every score is oriented so that higher means "more likely hallucinated"; baselines are
flipped where needed (`BASELINE_SIGNS`) before they reach these functions.

    report = score_metrics(labels, risk, calibrated=True)
    report["auroc"], report["auroc_ci95"], report["ece"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score

# Orientation of the free baselines: sign * stat is higher for likelier hallucinations.
BASELINE_SIGNS: dict[str, float] = {
    "length": 1.0,
    "mean_logprob": -1.0,
    "min_logprob": -1.0,
    "mean_entropy": 1.0,
    "max_entropy": 1.0,
}
N_BOOT = 1000


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or infinite values")
    return y, s


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _boot_indices(n: int, labels: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Stratified bootstrap resamples (class counts kept, so every resample has both)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    return [
        np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        for _ in range(n_boot)
    ]


def auroc_ci95(
    labels: np.ndarray, scores: np.ndarray, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the AUROC over stratified bootstrap resamples."""
    y, s = _check(labels, scores)
    if y.sum() == 0 or y.sum() == y.size:
        return (float("nan"), float("nan"))
    values = [auroc(y[idx], s[idx]) for idx in _boot_indices(y.size, y, n_boot, seed)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def paired_auroc_difference(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same answers, with a paired bootstrap 95% interval."""
    y, sa = _check(labels, a)
    _, sb = _check(labels, b)
    diffs = [
        auroc(y[idx], sa[idx]) - auroc(y[idx], sb[idx])
        for idx in _boot_indices(y.size, y, n_boot, seed)
    ]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {
        "difference": auroc(y, sa) - auroc(y, sb),
        "ci95": [float(lo), float(hi)],
        "p_not_better": float(np.mean(np.asarray(diffs) <= 0)),
    }


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE with ``bins`` equal-width bins on [0, 1]: sum_b (n_b / n) |mean(y_b) - mean(p_b)|."""
    y, p = _check(labels, probs)
    if y.size == 0:
        return float("nan")
    which = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() / y.size * abs(y[members].mean() - p[members].mean())
    return float(total)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Per equal-width bin: count, mean predicted risk, observed hallucination rate."""
    y, p = _check(labels, probs)
    which = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    out = []
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": n,
                "mean_risk": float(p[members].mean()) if n else None,
                "observed": float(y[members].mean()) if n else None,
            }
        )
    return out


def risk_coverage(labels: np.ndarray, scores: np.ndarray, points: int = 20) -> dict[str, Any]:
    """Keep the answers with the lowest scores: hallucination rate of the kept vs coverage.

    Returns ``curve`` (``points`` coverages) and ``aurc`` (area under the full curve;
    lower is better).
    """
    y, s = _check(labels, scores)
    order = np.argsort(s, kind="stable")
    kept_risk = np.cumsum(y[order]) / np.arange(1, y.size + 1)
    curve = []
    for coverage in np.linspace(1.0 / points, 1.0, points):
        k = max(1, int(round(coverage * y.size)))
        curve.append({"coverage": float(k / y.size), "risk": float(kept_risk[k - 1])})
    return {"curve": curve, "aurc": float(kept_risk.mean()) if y.size else float("nan")}


def threshold_summary(labels: np.ndarray, risk: np.ndarray, threshold: float) -> dict[str, Any]:
    """At ``threshold``: coverage (risk below it), accuracy of kept answers, accuracy of
    the decision "hallucinated iff risk >= threshold"."""
    y, r = _check(labels, risk)
    kept = r < threshold
    return {
        "threshold": float(threshold),
        "coverage": float(kept.mean()) if y.size else float("nan"),
        "kept_accuracy": float(1.0 - y[kept].mean()) if kept.any() else None,
        "decision_accuracy": float(((r >= threshold).astype(np.int64) == y).mean()),
    }


def length_controlled(
    labels: np.ndarray, scores: np.ndarray, lengths: np.ndarray, bins: int = 4
) -> dict[str, Any]:
    """AUROC inside answer-length quantile bins: does the score do more than count tokens?

    ``weighted_auroc`` averages the per-bin AUROCs by bin size (bins with one class
    only are skipped).
    """
    y, s = _check(labels, scores)
    length = np.asarray(lengths, dtype=np.float64).ravel()
    edges = np.unique(np.quantile(length, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, length, side="right") - 1, 0, max(len(edges) - 2, 0))
    per_bin, weights, values = [], [], []
    for b in np.unique(which):
        members = which == b
        value = auroc(y[members], s[members])
        per_bin.append(
            {
                "length_min": float(length[members].min()),
                "length_max": float(length[members].max()),
                "n": int(members.sum()),
                "hallucinated": int(y[members].sum()),
                "auroc": None if np.isnan(value) else value,
            }
        )
        if not np.isnan(value):
            weights.append(members.sum())
            values.append(value)
    weighted = float(np.average(values, weights=weights)) if values else None
    return {"weighted_auroc": weighted, "bins": per_bin}


def score_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    calibrated: bool,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one score. Brier and ECE only for calibrated probabilities."""
    y, s = _check(labels, scores)
    both = 0 < y.sum() < y.size
    out: dict[str, Any] = {
        "auroc": auroc(y, s),
        "auroc_ci95": list(auroc_ci95(y, s, n_boot, seed)),
        "auprc": float(average_precision_score(y, s)) if both else float("nan"),
        "risk_coverage": risk_coverage(y, s),
    }
    if calibrated:
        out["brier"] = float(np.mean((s - y) ** 2))
        out["ece"] = expected_calibration_error(y, s)
        out["reliability"] = reliability_bins(y, s)
        out["accuracy_at_0.5"] = threshold_summary(y, s, 0.5)
    return out


def nan_to_none(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None, numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class ScoredAnswers:
    """Served risk, its parts and the baselines' statistics for a set of answers (``[n]``)."""

    labels: np.ndarray
    risk: np.ndarray
    z: np.ndarray
    probe_logit: np.ndarray
    stats: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return int(self.labels.size)
