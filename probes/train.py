"""Fit the CETT probe: screening, C search by stratified CV, folding into raw units.

Only the train split is used here. The probe is ``StandardScaler`` + logistic regression
(label 1 = hallucinated, ``class_weight="balanced"``) on the answer's mean CETT over its
response tokens, optionally after keeping the ``screen_top_k`` neurons with the largest
univariate t-statistic (computed on the fitting rows only, inside every CV fold). The
scaler is folded into the weights, so the runtime's ``s_t = bias + sum w * CETT_t``
averaged over tokens equals the fitted decision function on the mean feature exactly.

Cross-validation also yields out-of-fold probe logits for every training answer: the
stacker (`probes.calibration`) is fitted on those, never on logits of answers the probe
was trained on.

    result = fit_probe(store, TrainConfig(penalty="l1", c_grid=[0.01]))
    result.weights  # ProbeWeights, non-zero neurons only
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from guard.errors import GuardError
from guard.probe import STAT_NAMES, ProbeWeights, StatName
from probes.calibration import stats_matrix
from probes.metrics import auroc

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]


class TrainingDataError(GuardError):
    """The features cannot train a probe as configured (too few answers of a class...)."""


class FeatureSource(Protocol):
    """What training needs from `probes.extract.FeatureStore` (feature = layer * width + j)."""

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def meta(self) -> Mapping[str, np.ndarray]: ...

    def load(
        self, kind: str, rows: np.ndarray | None = None, columns: np.ndarray | None = None
    ) -> np.ndarray: ...


class TrainConfig(BaseModel):
    """How to fit the probe and the served score. Defaults are the shipped recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    penalty: Literal["l1", "l2"] = "l1"
    c_grid: list[float] = Field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05, 0.1])
    mode: Literal["1-vs-1", "3-vs-1"] = "1-vs-1"
    features: Literal["cett", "hybrid"] = "cett"
    consistency_filter: bool = False
    screen_top_k: int | None = Field(default=4000, ge=1)
    stacker: bool = True
    stacker_stats: list[StatName] = Field(default_factory=lambda: list(STAT_NAMES))
    stacker_c: float = Field(default=1.0, gt=0)
    select_c: Literal["probe", "served"] = "served"  # CV criterion: probe or stacked AUROC
    calibrator: Literal["platt", "isotonic"] = "platt"
    flag_accuracy_gain: float = Field(default=3.0, gt=1.0)
    abstain_accuracy_gain: float = Field(default=2.0, gt=1.0)
    cv_folds: int = Field(default=5, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _compatible(self) -> TrainConfig:
        if self.features == "hybrid" and self.mode == "3-vs-1":
            raise ValueError(
                "hybrid features need logit statistics, which 3-vs-1's extra rows lack"
            )
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError("c_grid needs at least one positive C")
        return self


@dataclass
class LinearFit:
    """One fitted probe in raw feature units: ``logit = bias + X[:, columns] @ weights``."""

    columns: np.ndarray  # [k] feature indices (layer * width + neuron), non-zero weights
    weights: np.ndarray  # [k] float64
    bias: float
    estimator: Any = None  # (scaler, LogisticRegression, screened columns) for analysis
    stat_weights: np.ndarray | None = None  # hybrid: raw weights of the STAT_NAMES columns

    def probe_logit(self, features: np.ndarray) -> np.ndarray:
        """The CETT part only (what the runtime's ``s_t`` averages to): ``[n, k]`` -> ``[n]``."""
        return np.asarray(features, dtype=np.float64) @ self.weights + self.bias

    def decision(self, features: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
        """Logits from rows of *these columns* ``[n, k]`` (and ``[n, 5]`` stats if hybrid)."""
        out = np.asarray(features, dtype=np.float64) @ self.weights + self.bias
        if self.stat_weights is not None:
            if stats is None:
                raise ValueError("a hybrid probe needs the logit statistics")
            out = out + np.asarray(stats, dtype=np.float64) @ self.stat_weights
        return out

    def to_weights(self, width: int) -> ProbeWeights:
        return ProbeWeights(
            layers=(self.columns // width).astype(np.int64),
            neurons=(self.columns % width).astype(np.int64),
            weights=self.weights.astype(np.float64),
            bias=float(self.bias),
        )


@dataclass
class CVResult:
    """Stratified CV on the train split for every C: AUROCs, sparsity, out-of-fold logits."""

    c_grid: list[float]
    fold_auroc: np.ndarray  # [n_c, folds]
    fold_neurons: np.ndarray  # [n_c, folds]
    oof_logits: np.ndarray  # [n_c, n_train]
    best_index: int = 0
    table: list[dict[str, float]] = field(default_factory=list)


def split_rows(store: FeatureSource, split: Split, *, consistent_only: bool = False) -> np.ndarray:
    """Row indices of a split with at least one response token (sorted)."""
    meta = store.meta
    keep = (np.asarray(meta["split"]) == split) & (np.asarray(meta["length"]) > 0)
    if consistent_only:
        if "consistent" not in meta:
            raise TrainingDataError("consistency filter needs sampled answers: build --samples K")
        keep &= np.asarray(meta["consistent"]).astype(bool)
    return np.flatnonzero(keep)


def labels_of(store: FeatureSource, rows: np.ndarray) -> np.ndarray:
    return np.asarray(store.meta["label"])[rows].astype(np.int64)


def t_statistics(x: np.ndarray, y: np.ndarray, block: int = 4096) -> np.ndarray:
    """Welch t-statistic of every column between label 1 and label 0 rows: ``[d]``.

    Computed ``block`` columns at a time: the float64 temporaries of a whole-width
    variance (tens of thousands of neurons x thousands of answers) would cost GBs."""
    pos_rows, neg_rows = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    out = np.empty(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[1], block):
        pos = x[pos_rows, start : start + block]
        neg = x[neg_rows, start : start + block]
        mean_diff = pos.mean(axis=0, dtype=np.float64) - neg.mean(axis=0, dtype=np.float64)
        var = pos.var(axis=0, dtype=np.float64) / max(len(pos), 1) + neg.var(
            axis=0, dtype=np.float64
        ) / max(len(neg), 1)
        out[start : start + block] = mean_diff / np.sqrt(var + 1e-24)
    return out


def screen_columns(x: np.ndarray, y: np.ndarray, top_k: int | None) -> np.ndarray:
    """Columns (of ``x``) kept for fitting: the ``top_k`` largest ``|t|``, sorted."""
    if top_k is None or top_k >= x.shape[1]:
        return np.arange(x.shape[1])
    score = np.abs(t_statistics(x, y))
    return np.sort(np.argpartition(-score, top_k - 1)[:top_k])


def make_estimator(penalty: str, c: float, seed: int) -> LogisticRegression:
    """L1 by liblinear (exact zeros), L2 by lbfgs; class-balanced in both cases."""
    if penalty == "l1":
        return LogisticRegression(
            C=c,
            l1_ratio=1.0,
            solver="liblinear",
            class_weight="balanced",
            intercept_scaling=10.0,
            max_iter=2000,
            random_state=seed,
        )
    return LogisticRegression(
        C=c, l1_ratio=0.0, solver="lbfgs", class_weight="balanced", max_iter=2000
    )


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    c: float,
    screened: np.ndarray | None = None,
    stats: np.ndarray | None = None,
) -> LinearFit:
    """Screen (unless given), scale and fit; return the fit folded into raw units.

    ``x`` ``[n, d]`` raw features; the returned columns index ``x``'s columns. ``stats``
    ``[n, 5]`` (hybrid probes) are appended after screening and never screened out.
    """
    if len(np.unique(y)) < 2:
        raise TrainingDataError("the training rows hold only one class: use more questions")
    cols = screen_columns(x, y, config.screen_top_k) if screened is None else screened
    design = np.asarray(x[:, cols], dtype=np.float64)
    if stats is not None:
        design = np.concatenate([design, np.asarray(stats, dtype=np.float64)], axis=1)
    scaler = StandardScaler()
    model = make_estimator(config.penalty, c, config.seed).fit(scaler.fit_transform(design), y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    raw = model.coef_[0] / scale
    bias = float(model.intercept_[0] - np.sum(raw * scaler.mean_))
    stat_weights = None
    if stats is not None:
        raw, stat_weights = raw[: cols.size], raw[cols.size :]
    nonzero = raw != 0
    return LinearFit(cols[nonzero], raw[nonzero], bias, (scaler, model, cols), stat_weights)


def _fold_fits(x: np.ndarray, y: np.ndarray, data: TrainingData, config: TrainConfig) -> CVResult:
    """Run the C grid over stratified folds of the answers (extra negatives only in fits)."""
    n_c = len(config.c_grid)
    folds = StratifiedKFold(config.cv_folds, shuffle=True, random_state=config.seed)
    result = CVResult(
        list(config.c_grid),
        np.zeros((n_c, config.cv_folds)),
        np.zeros((n_c, config.cv_folds)),
        np.zeros((n_c, len(y))),
    )
    for f, (fit_idx, held_idx) in enumerate(folds.split(np.zeros(len(y)), y)):
        x_fit, y_fit, s_fit = data.fitting_rows(fit_idx)
        cols = screen_columns(x_fit, y_fit, config.screen_top_k)
        s_held = None if data.stats is None else data.stats[held_idx]
        for i, c in enumerate(config.c_grid):
            fit = fit_linear(x_fit, y_fit, config, c, screened=cols, stats=s_fit)
            logits = fit.decision(x[held_idx][:, fit.columns], s_held)
            result.oof_logits[i, held_idx] = logits
            result.fold_auroc[i, f] = auroc(y[held_idx], logits)
            result.fold_neurons[i, f] = fit.columns.size
    return result


def cross_validate(data: TrainingData, config: TrainConfig) -> CVResult:
    """CV over ``config.c_grid``; picks the C with the best mean fold AUROC."""
    x, y = data.x, data.y
    if min(int(y.sum()), int((1 - y).sum())) < config.cv_folds:
        raise TrainingDataError(
            f"{int(y.sum())} hallucinated and {int((1 - y).sum())} correct training answers: "
            f"need at least {config.cv_folds} of each for {config.cv_folds}-fold CV; "
            "use more questions (--limit)"
        )
    result = _fold_fits(x, y, data, config)
    mean = np.nanmean(result.fold_auroc, axis=1)
    result.best_index = int(np.nanargmax(mean))
    result.table = [
        {
            "C": c,
            "cv_auroc": float(mean[i]),
            "cv_auroc_sd": float(np.nanstd(result.fold_auroc[i])),
            "oof_auroc": auroc(y, result.oof_logits[i]),
            "neurons": float(result.fold_neurons[i].mean()),
        }
        for i, c in enumerate(result.c_grid)
    ]
    return result


@dataclass
class TrainingData:
    """The training answers: features ``x`` ``[n, L*I]``, labels, stats (hybrid), extras.

    ``extra``: 3-vs-1's additional label-0 rows (non-answer tokens of correct answers).
    """

    rows: np.ndarray
    x: np.ndarray
    y: np.ndarray
    stats: np.ndarray | None = None
    extra: np.ndarray | None = None

    def fitting_rows(
        self, idx: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(x, y, stats)`` of answers ``idx`` (all when None) plus the extra negatives."""
        pick = slice(None) if idx is None else idx
        x, y = self.x[pick], self.y[pick]
        stats = None if self.stats is None else self.stats[pick]
        if self.extra is not None and self.extra.size:
            x = np.concatenate([x, self.extra])
            y = np.concatenate([y, np.zeros(len(self.extra), dtype=np.int64)])
        return x, y, stats


def load_training_data(store: FeatureSource, config: TrainConfig) -> TrainingData:
    """The train split's answers as configured (consistency filter, hybrid, 3-vs-1).

    3-vs-1 adds, as extra label-0 rows, the mean CETT over the non-answer response tokens
    of correct answers whose answer span is known.
    """
    rows = split_rows(store, "train", consistent_only=config.consistency_filter)
    data = TrainingData(rows, store.load("resp_mean", rows=rows), labels_of(store, rows))
    if config.features == "hybrid":
        data.stats = stats_matrix(store.meta, rows)
    if config.mode == "3-vs-1":
        has_span = np.asarray(store.meta["has_span"]).astype(bool)[rows]
        extra_rows = rows[has_span & (data.y == 0)]
        if extra_rows.size:
            extra = store.load("other_mean", rows=extra_rows)
            data.extra = extra[np.isfinite(extra).all(axis=1)]  # NaN: span = whole answer
    return data


@dataclass
class ProbeFit:
    """The trained probe on the train split, with its CV record."""

    fit: LinearFit
    cv: CVResult
    c: float
    train_rows: np.ndarray
    train_labels: np.ndarray

    @property
    def oof_logits(self) -> np.ndarray:
        return self.cv.oof_logits[self.cv.best_index]


def select_for_served(cv: CVResult, stats: np.ndarray, y: np.ndarray, config: TrainConfig) -> None:
    """Re-pick C by the AUROC of the stacked out-of-fold score (what is served).

    The stacker has a handful of parameters, so fitting and scoring it on the same
    out-of-fold logits is nearly unbiased; the probe logits themselves are out of fold.
    """
    from probes.calibration import apply_stacker, fit_stacker

    values = []
    for i, row in enumerate(cv.table):
        oof = cv.oof_logits[i]
        if np.ptp(oof) == 0:  # no neuron survived: the stack is the statistics alone
            values.append(-np.inf)
            row["stacked_oof_auroc"] = float("nan")
            continue
        stacker = fit_stacker(oof, stats, y, config.stacker_c, config.stacker_stats)
        row["stacked_oof_auroc"] = auroc(y, apply_stacker(stacker, oof, stats))
        values.append(row["stacked_oof_auroc"])
    cv.best_index = int(np.argmax(values))


def fit_probe(store: FeatureSource, config: TrainConfig) -> ProbeFit:
    """CV the C grid on the train split, refit the best C on all of it."""
    data = load_training_data(store, config)
    cv = cross_validate(data, config)
    if config.select_c == "served" and config.stacker and config.features == "cett":
        select_for_served(cv, stats_matrix(store.meta, data.rows), data.y, config)
    c = cv.c_grid[cv.best_index]
    log.info("probe CV: %s; chosen C=%g", cv.table, c)
    x_all, y_all, s_all = data.fitting_rows()
    fit = fit_linear(x_all, y_all, config, c, stats=s_all)
    return ProbeFit(fit, cv, c, data.rows, data.y)


def sparsity_curve(
    store: FeatureSource,
    config: TrainConfig,
    c_values: Sequence[float],
    evaluate_on: Mapping[str, FeatureSource | tuple[FeatureSource, np.ndarray]],
) -> list[dict[str, Any]]:
    """Neurons kept vs AUROC of the CETT probe alone, for L1 probes at each C.

    ``evaluate_on`` maps a name to a store (all rows with tokens) or (store, rows).
    """
    data = load_training_data(store, config.model_copy(update={"features": "cett"}))
    x, y, _ = data.fitting_rows()
    screened = screen_columns(x, y, config.screen_top_k)
    l1 = config.model_copy(update={"penalty": "l1", "features": "cett"})
    curve = []
    for c in c_values:
        fit = fit_linear(x, y, l1, c, screened=screened)
        point: dict[str, Any] = {"C": c, "neurons": int(fit.columns.size)}
        for name, target in evaluate_on.items():
            other, other_rows = target if isinstance(target, tuple) else (target, None)
            if other_rows is None:
                other_rows = np.flatnonzero(np.asarray(other.meta["length"]) > 0)
            feats = other.load("resp_mean", rows=other_rows, columns=fit.columns)
            point[name] = auroc(labels_of(other, other_rows), fit.decision(feats))
        curve.append(point)
    return curve
