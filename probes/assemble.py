"""Train the served score end to end and describe it as a probe manifest.

`train_served_probe` chains the pieces in the only order that keeps every stage honest:
probe fitted by CV on the train split (`probes.train`), stacker on the train split's
*out-of-fold* probe logits, calibrator and thresholds on the validation split
(`probes.calibration`). `assemble_probe` turns the result into a `ProbeManifest`.

    trained = train_served_probe(store, TrainConfig())
    manifest = assemble_probe(trained, loaded, store, build_config, "smollm2-triviaqa")
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.probe import (
    STAT_NAMES,
    IsotonicCalibrator,
    PlattCalibrator,
    ProbeManifest,
    ProbeWeights,
    ScoringRecipe,
    Stacker,
    Thresholds,
)
from probes.calibration import (
    apply_stacker,
    choose_thresholds,
    fit_calibrator,
    fit_stacker,
    risk_quantiles,
    stats_matrix,
)
from probes.config import BuildConfig
from probes.train import FeatureSource, ProbeFit, TrainConfig, fit_probe, labels_of, split_rows


@dataclass
class TrainedProbe:
    """Everything the served score needs, fitted, plus what it was fitted on."""

    config: TrainConfig
    fit: ProbeFit
    weights: ProbeWeights
    stacker: Stacker | None
    calibrator: PlattCalibrator | IsotonicCalibrator
    thresholds: Thresholds
    quantiles: dict[str, float]
    val_rows: np.ndarray

    def h_neurons(self, width: int) -> list[dict[str, Any]]:
        """Positive-weight neurons (layer, neuron, raw weight), strongest first."""
        w = self.weights
        order = np.argsort(-w.weights)
        return [
            {"layer": int(w.layers[i]), "neuron": int(w.neurons[i]), "weight": float(w.weights[i])}
            for i in order
            if w.weights[i] > 0
        ]

    def sklearn_objects(self) -> dict[str, Any]:
        scaler, model, screened = self.fit.fit.estimator
        return {"scaler": scaler, "model": model, "screened_columns": screened}


def served_stacker(config: TrainConfig, fit: ProbeFit, store: FeatureSource) -> Stacker | None:
    """Hybrid: the probe's own statistic weights; else a stacker on out-of-fold logits."""
    if config.features == "hybrid":
        sw = fit.fit.stat_weights
        if sw is None:
            raise ValueError("a hybrid fit carries statistic weights")
        coef = {name: float(v) for name, v in zip(STAT_NAMES, sw, strict=True)}
        return Stacker(probe_coef=1.0, coef=coef, intercept=0.0)
    if not config.stacker:
        return None
    stats = stats_matrix(dict(store.meta), fit.train_rows)
    return fit_stacker(
        fit.oof_logits, stats, fit.train_labels, config.stacker_c, config.stacker_stats
    )


def validation_scores(
    fit: ProbeFit, stacker: Stacker | None, store: FeatureSource, rows: np.ndarray
) -> np.ndarray:
    """Stacked scores ``z`` of validation answers ``[n]``."""
    feats = store.load("resp_mean", rows=rows, columns=fit.fit.columns)
    stats = stats_matrix(dict(store.meta), rows)
    return apply_stacker(stacker, fit.fit.probe_logit(feats), stats)


def train_served_probe(store: FeatureSource, config: TrainConfig) -> TrainedProbe:
    """Probe (train, CV), stacker (train, out of fold), calibrator + thresholds (val)."""
    fit = fit_probe(store, config)
    stacker = served_stacker(config, fit, store)
    val_rows = split_rows(store, "val")
    y_val = labels_of(store, val_rows)
    if not 0 < y_val.sum() < y_val.size:
        raise ValueError(
            f"the validation split holds {y_val.size} answers, {int(y_val.sum())} hallucinated: "
            "calibration needs both classes; use more questions"
        )
    z_val = validation_scores(fit, stacker, store, val_rows)
    calibrator = fit_calibrator(z_val, y_val, config.calibrator)
    risk_val = np.clip(calibrator(z_val), 0.0, 1.0)
    thresholds = choose_thresholds(
        risk_val, y_val, config.flag_accuracy_gain, config.abstain_accuracy_gain
    )
    return TrainedProbe(
        config,
        fit,
        fit.fit.to_weights(store.width),
        stacker,
        calibrator,
        thresholds,
        risk_quantiles(risk_val),
        val_rows,
    )


def data_description(store: FeatureSource) -> dict[str, Any]:
    """Answers and hallucination rate per split."""
    meta = store.meta
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        rows = split_rows(store, split)
        y = labels_of(store, rows)
        out[split] = {
            "answers": int(rows.size),
            "hallucinated": int(y.sum()),
            "hallucinated_fraction": float(y.mean()) if y.size else None,
            "with_answer_span": int(np.asarray(meta["has_span"])[rows].sum()),
        }
    return out


def assemble_probe(
    trained: TrainedProbe, loaded: Any, store: FeatureSource, build: BuildConfig, name: str
) -> ProbeManifest:
    """The manifest of a trained probe (files and evaluation are filled in later)."""
    from guard.probe import sha256_file

    cfg = trained.config
    fit = trained.fit
    training = {
        "model_spec": build.model,
        "dataset": str(build.dataset),
        "dataset_sha256": sha256_file(build.dataset),
        "limit": build.limit,
        "samples": build.samples,
        "answers": len(store.ids),
        "skipped_empty_answers": len(getattr(store, "skipped", [])),
        "splits": data_description(store),
        "label": "1 = hallucinated (judge: TriviaQA-normalised alias match)",
        "class_balance": "class_weight='balanced' in the probe and the stacker; the "
        "calibrator is unweighted, so risks are probabilities at the validation base rate",
        "recipe": cfg.model_dump(),
        "chosen_C": fit.c,
        "cv": fit.cv.table,
        "neurons": int(trained.weights.weights.size),
        "h_neurons": int((trained.weights.weights > 0).sum()),
        "stacker_fitted_on": "out-of-fold probe logits of the train split",
        "calibrator_fitted_on": "validation split",
    }
    return ProbeManifest(
        name=name,
        model_id=loaded.model_id,
        fingerprint=loaded.fingerprint,
        prompt=build.recipe,
        scoring=ScoringRecipe(
            pooling="mean", stacker=trained.stacker, calibrator=trained.calibrator
        ),
        thresholds=trained.thresholds,
        validation_risk_quantiles=trained.quantiles,
        training=training,
        versions=library_versions(),
    )


def library_versions() -> dict[str, str]:
    import sklearn
    import torch
    import transformers

    from guard import __version__ as guard_version

    return {
        "python": platform.python_version(),
        "hallucination-guard": str(guard_version),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }
