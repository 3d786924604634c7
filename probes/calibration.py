"""From probe logits to the served risk: stacker, calibrator, thresholds, quantiles.

- The stacker (`guard.probe.Stacker`) is a small logistic regression on the probe logit
  and the free logit statistics (`guard.probe.STAT_NAMES`), fitted on *out-of-fold*
  probe logits of the train split (`probes.train.cross_validate`), scaling folded in.
- The calibrator (Platt or isotonic) maps the stacked score ``z`` to a probability of
  hallucination; it is fitted on the validation split only.
- Thresholds are picked on the validation split for goals that mean something when
  most answers are wrong: answers kept below the abstain threshold are
  ``abstain_accuracy_gain`` times as often correct as the base rate, answers passed
  below the flag threshold ``flag_accuracy_gain`` times (a stricter goal, so flag <=
  abstain). Each goal is stored with the coverage it reached.

    stacker = fit_stacker(oof_logits, stats, labels)
    calibrator = fit_calibrator(z_val, y_val, "platt")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from guard.probe import (
    STAT_NAMES,
    IsotonicCalibrator,
    PlattCalibrator,
    Stacker,
    StatName,
    Thresholds,
)

QUANTILES = ("0.1", "0.25", "0.5", "0.75", "0.9", "0.99")
MIN_KEPT = 10  # a threshold must keep at least this many validation answers


def stats_matrix(meta: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The logit statistics of ``rows`` in `STAT_NAMES` order: ``[n, 5]`` float64."""
    return np.stack([np.asarray(meta[name], dtype=np.float64)[rows] for name in STAT_NAMES], 1)


def fit_stacker(
    probe_logits: np.ndarray | None,
    stats: np.ndarray,
    labels: np.ndarray,
    c: float = 1.0,
    names: Sequence[StatName] = STAT_NAMES,
) -> Stacker:
    """L2 logistic regression on [probe logit, stats ``names``], folded into raw units.

    ``stats`` ``[n, 5]`` in `STAT_NAMES` order. ``probe_logits=None`` fits the statistics
    alone (``probe_coef = 0``): the free baseline stack the served score is compared with.
    """
    picked = stats[:, [STAT_NAMES.index(name) for name in names]]
    cols = [picked] if probe_logits is None else [probe_logits[:, None], picked]
    x = np.concatenate(cols, axis=1).astype(np.float64)
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, l1_ratio=0.0, class_weight="balanced", max_iter=5000)
    model.fit(scaler.transform(x), labels)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    raw = model.coef_[0] / scale
    intercept = float(model.intercept_[0] - np.sum(raw * scaler.mean_))
    probe_coef = 0.0 if probe_logits is None else float(raw[0])
    stat_coef = raw if probe_logits is None else raw[1:]
    return Stacker(
        probe_coef=probe_coef,
        coef={name: float(v) for name, v in zip(names, stat_coef, strict=True)},
        intercept=intercept,
    )


def apply_stacker(
    stacker: Stacker | None, probe_logits: np.ndarray, stats: np.ndarray
) -> np.ndarray:
    """Vectorised ``z`` (same formula as `guard.scoring.RiskScorer.stack`)."""
    logits = np.asarray(probe_logits, dtype=np.float64)
    if stacker is None:
        return logits
    coef = np.array([stacker.coef.get(name, 0.0) for name in STAT_NAMES])
    return np.asarray(stacker.intercept + stacker.probe_coef * logits + stats @ coef)


def fit_calibrator(
    z: np.ndarray, labels: np.ndarray, kind: str
) -> PlattCalibrator | IsotonicCalibrator:
    """Platt (1-D logistic regression, no class weights) or isotonic, on validation data."""
    z = np.asarray(z, dtype=np.float64)
    if kind == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, labels)
        x_pts = [float(v) for v in iso.X_thresholds_]
        y_pts = [float(v) for v in iso.y_thresholds_]
        if len(x_pts) < 2:
            x_pts, y_pts = [float(z.min()), float(z.max()) + 1e-9], [y_pts[0]] * 2
        return IsotonicCalibrator(x=x_pts, y=y_pts)
    model = LogisticRegression(C=1e6, l1_ratio=0.0, max_iter=5000).fit(z[:, None], labels)
    return PlattCalibrator(a=float(model.coef_[0, 0]), b=float(model.intercept_[0]))


def threshold_for_gain(risk: np.ndarray, labels: np.ndarray, gain: float) -> dict[str, Any]:
    """The largest threshold whose kept answers (risk below it) reach ``gain`` x base accuracy.

    Falls back to the threshold with the best kept accuracy (``met: false``) when the goal
    cannot be reached while keeping at least `MIN_KEPT` answers.
    """
    order = np.argsort(risk, kind="stable")
    r, correct = risk[order], 1 - labels[order]
    base = float(correct.mean())
    kept_acc = np.cumsum(correct) / np.arange(1, r.size + 1)
    # k kept answers is a valid cut only where the next risk is strictly larger
    valid = np.append(r[1:] > r[:-1], True)
    valid[: MIN_KEPT - 1] = False
    target = gain * base
    candidates = np.flatnonzero(valid & (kept_acc >= target))
    met = candidates.size > 0
    if met:
        k = int(candidates.max()) + 1
    else:
        k = int(np.flatnonzero(valid)[np.argmax(kept_acc[valid])]) + 1 if valid.any() else r.size
    threshold = 1.0 if k >= r.size else float((r[k - 1] + r[k]) / 2)
    return {
        "goal": f"answers with risk below the threshold are correct {gain:g}x as often as "
        "the validation base rate",
        "base_accuracy": base,
        "target_accuracy": target,
        "met": bool(met),
        "threshold": threshold,
        "coverage": float(k / r.size),
        "kept_accuracy": float(kept_acc[k - 1]),
    }


def choose_thresholds(
    risk: np.ndarray, labels: np.ndarray, flag_gain: float, abstain_gain: float
) -> Thresholds:
    """Flag and abstain thresholds on validation risk (flag <= abstain), with their goals."""
    risk = np.asarray(risk, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    abstain = threshold_for_gain(risk, labels, abstain_gain)
    flag = threshold_for_gain(risk, labels, flag_gain)
    flag_t = min(flag["threshold"], abstain["threshold"])
    return Thresholds(
        flag=flag_t,
        abstain=abstain["threshold"],
        goals={
            "chosen_on": "validation split",
            "flag": flag,
            "abstain": abstain,
            "abort": "not set by training: the serving policy decides (GUARD_ABORT_THRESHOLD)",
        },
    )


def risk_quantiles(risk: np.ndarray) -> dict[str, float]:
    """Validation risk quantiles for drift monitoring (`QUANTILES`)."""
    return {q: float(np.quantile(risk, float(q))) for q in QUANTILES}
