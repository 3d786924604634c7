"""Probe fitting: planted signals are recovered, folded weights are exact, CV is honest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from guard.probe import STAT_NAMES
from probes.calibration import (
    apply_stacker,
    choose_thresholds,
    fit_calibrator,
    fit_stacker,
    stats_matrix,
    threshold_for_gain,
)
from probes.metrics import auroc, expected_calibration_error
from probes.train import (
    TrainConfig,
    TrainingDataError,
    fit_linear,
    fit_probe,
    load_training_data,
    screen_columns,
    sparsity_curve,
    split_rows,
)
from tests.probes.planted import PLANTED, PlantedStore

FAST = {"c_grid": [0.05, 0.5], "cv_folds": 3}


def planted_columns(store: PlantedStore) -> set[int]:
    return {layer * store.width + neuron for layer, neuron in PLANTED}


def test_l1_probe_recovers_the_planted_neurons() -> None:
    store = PlantedStore()
    result = fit_probe(store, TrainConfig(penalty="l1", **FAST))
    weights = dict(zip(result.fit.columns.tolist(), result.fit.weights.tolist(), strict=True))
    for column in planted_columns(store):
        assert weights.get(column, 0.0) > 0, f"planted neuron {column} not positive"
    top_two = set(sorted(weights, key=lambda c: -weights[c])[:2])
    assert top_two == planted_columns(store)
    assert max(row["cv_auroc"] for row in result.cv.table) > 0.9


def test_probe_weights_map_columns_to_layers_and_neurons() -> None:
    store = PlantedStore()
    result = fit_probe(store, TrainConfig(penalty="l1", **FAST))
    probe_weights = result.fit.to_weights(store.width)
    pairs = set(zip(probe_weights.layers.tolist(), probe_weights.neurons.tolist(), strict=True))
    assert set(PLANTED) <= pairs
    assert np.all(probe_weights.weights != 0)


@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("screen", [None, 10])
def test_folded_weights_equal_sklearn_decision_function(penalty: str, screen: int | None) -> None:
    store = PlantedStore(n=300)
    x = store.load("resp_mean")
    y = store.meta["label"].astype(np.int64)
    config = TrainConfig(penalty=penalty, screen_top_k=screen)  # type: ignore[arg-type]
    fit = fit_linear(x, y, config, c=0.3)
    scaler, model, screened = fit.estimator
    expected = model.decision_function(scaler.transform(x[:, screened].astype(np.float64)))
    np.testing.assert_allclose(fit.decision(x[:, fit.columns]), expected, rtol=1e-9, atol=1e-9)


def test_hybrid_fit_folds_statistics_too() -> None:
    store = PlantedStore(n=300)
    x = store.load("resp_mean")
    y = store.meta["label"].astype(np.int64)
    stats = stats_matrix(store.meta, np.arange(300))
    fit = fit_linear(x, y, TrainConfig(penalty="l2", features="hybrid"), c=0.3, stats=stats)
    scaler, model, screened = fit.estimator
    design = np.concatenate([x[:, screened].astype(np.float64), stats], axis=1)
    expected = model.decision_function(scaler.transform(design))
    np.testing.assert_allclose(fit.decision(x[:, fit.columns], stats), expected, atol=1e-9)
    assert fit.stat_weights is not None
    assert fit.stat_weights[STAT_NAMES.index("max_entropy")] > 0  # the planted statistic


def test_mean_of_token_logits_equals_logit_of_mean_feature() -> None:
    """Why the runtime may score tokens one by one: the probe is linear in CETT."""
    store = PlantedStore(n=300)
    fit = fit_probe(store, TrainConfig(penalty="l2", **FAST)).fit
    tokens = torch.rand(7, fit.columns.size, dtype=torch.float64)  # [tokens, k]
    per_token = fit.decision(tokens.numpy())
    assert per_token.mean() == pytest.approx(fit.decision(tokens.mean(0, keepdim=True).numpy())[0])


def test_screening_is_fitted_on_training_rows_only() -> None:
    store = PlantedStore(n=400)
    train = split_rows(store, "train")
    x, y = store.load("resp_mean", rows=train), store.meta["label"][train]
    kept = screen_columns(x, y, 5)
    assert kept.size == 5
    assert planted_columns(store) <= set(kept.tolist())


def test_out_of_fold_logits_are_not_fitted_on_their_own_answers() -> None:
    store = PlantedStore(n=400, strength=0.0)  # no signal: in-sample fits would still score
    result = fit_probe(store, TrainConfig(penalty="l2", c_grid=[10.0], cv_folds=3))
    assert auroc(result.train_labels, result.oof_logits) < 0.62


def test_three_vs_one_adds_non_answer_rows_as_negatives() -> None:
    store = PlantedStore()
    data = load_training_data(store, TrainConfig(mode="3-vs-1"))
    assert data.extra is not None and len(data.extra) > 0
    x, y, _ = data.fitting_rows()
    assert len(x) == len(data.x) + len(data.extra)
    assert int((y == 0).sum()) == int((data.y == 0).sum()) + len(data.extra)
    result = fit_probe(store, TrainConfig(mode="3-vs-1", **FAST))
    assert result.fit.columns.size > 0


def test_consistency_filter_keeps_consistent_answers_only() -> None:
    store = PlantedStore()
    data = load_training_data(store, TrainConfig(consistency_filter=True))
    assert store.meta["consistent"][data.rows].all()
    assert data.rows.size < split_rows(store, "train").size


def test_too_few_positives_is_a_clear_error() -> None:
    store = PlantedStore(n=40, rate=0.02)
    with pytest.raises(TrainingDataError, match="more questions"):
        fit_probe(store, TrainConfig(**FAST))


def test_incompatible_recipe_is_rejected() -> None:
    with pytest.raises(ValidationError, match="3-vs-1"):
        TrainConfig(features="hybrid", mode="3-vs-1")
    with pytest.raises(ValidationError):
        TrainConfig(c_grid=[])


def test_sparsity_curve_grows_with_c() -> None:
    store = PlantedStore()
    curve = sparsity_curve(store, TrainConfig(), [0.01, 0.1, 1.0], {"test": store})
    neurons = [point["neurons"] for point in curve]
    assert neurons == sorted(neurons) and neurons[-1] > neurons[0]
    assert all(0.0 <= point["test"] <= 1.0 for point in curve)


def test_stacker_weighs_the_informative_inputs_in_raw_units() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.5).astype(np.int64)
    logits = 2.0 * y + rng.normal(size=2000)
    stats = rng.normal(size=(2000, len(STAT_NAMES))) * 10.0
    stats[:, STAT_NAMES.index("mean_logprob")] -= 5.0 * y  # lower log-prob when wrong
    stacker = fit_stacker(logits, stats, y)
    assert stacker.probe_coef > 0
    assert stacker.coef["mean_logprob"] < 0
    assert abs(stacker.coef["length"]) < abs(stacker.coef["mean_logprob"])
    z = apply_stacker(stacker, logits, stats)
    assert auroc(y, z) > max(auroc(y, logits), auroc(y, -stats[:, 1]))
    alone = fit_stacker(None, stats, y)
    assert alone.probe_coef == 0.0


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_calibrator_makes_risks_match_frequencies(kind: str) -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=5000) * 2
    y = (rng.random(5000) < 1 / (1 + np.exp(-(1.5 * z - 2)))).astype(np.int64)
    calibrator = fit_calibrator(z, y, kind)
    risk = calibrator(z)
    assert expected_calibration_error(y, risk) < 0.03
    assert expected_calibration_error(y, 1 / (1 + np.exp(-z))) > 0.1  # uncalibrated


def test_thresholds_meet_their_accuracy_goals() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(3000) < 0.88).astype(np.int64)
    risk = np.clip(0.75 + 0.2 * y + rng.normal(scale=0.1, size=3000), 0, 1)
    base = 1 - y.mean()
    thresholds = choose_thresholds(risk, y, flag_gain=3.0, abstain_gain=2.0)
    assert thresholds.flag <= thresholds.abstain
    kept = risk < thresholds.abstain
    assert 1 - y[kept].mean() >= 2 * base
    goal = thresholds.goals["abstain"]
    assert goal["met"] and goal["coverage"] == pytest.approx(kept.mean())
    assert 1 - y[risk < thresholds.flag].mean() >= 3 * base


def test_unreachable_goal_is_reported_not_met() -> None:
    y = np.array([1, 0] * 50)
    risk = np.full(100, 0.5)
    goal = threshold_for_gain(risk, y, 2.0)
    assert goal["met"] is False
    assert goal["threshold"] == 1.0


def test_hybrid_served_score_equals_the_fitted_hybrid_model() -> None:
    from pathlib import Path

    from guard.fingerprint import ModelFingerprint
    from guard.probe import Probe, ProbeManifest, ScoringRecipe, Thresholds
    from probes.assemble import train_served_probe
    from probes.evaluate import score_store

    store = PlantedStore()
    trained = train_served_probe(store, TrainConfig(penalty="l2", features="hybrid", **FAST))
    assert trained.stacker is not None and trained.stacker.probe_coef == 1.0
    fingerprint = ModelFingerprint(
        architecture="x", num_layers=store.num_layers, mlp_width=store.width, down_proj_sha256="0"
    )
    manifest = ProbeManifest(
        name="hybrid",
        model_id="x",
        fingerprint=fingerprint,
        scoring=ScoringRecipe(stacker=trained.stacker, calibrator=trained.calibrator),
        thresholds=Thresholds(flag=0.5, abstain=0.9),
    )
    rows = split_rows(store, "test")
    scored = score_store(Probe(manifest, trained.weights, Path("."), ""), store, rows)
    fit = trained.fit.fit
    expected = fit.decision(
        store.load("resp_mean", rows=rows, columns=fit.columns), stats_matrix(store.meta, rows)
    )
    np.testing.assert_allclose(scored.z, expected, rtol=1e-5, atol=1e-5)


def test_c_is_chosen_by_the_served_score_when_stacking() -> None:
    store = PlantedStore()
    result = fit_probe(store, TrainConfig(penalty="l1", select_c="served", **FAST))
    stacked = [row["stacked_oof_auroc"] for row in result.cv.table]
    assert result.c == result.cv.c_grid[int(np.nanargmax(stacked))]
    probe_only = fit_probe(store, TrainConfig(penalty="l1", select_c="probe", **FAST))
    assert "stacked_oof_auroc" not in probe_only.cv.table[0]
