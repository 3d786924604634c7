"""``hguard probes build`` end to end: a tiny random model fast, the real model slow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guard.probe import SCOPE_FILE, SKLEARN_FILE, load_probe
from guard.scoring import RiskScorer
from probes.build import BuildConfig, build, export_probe
from probes.collect import read_answers
from probes.evaluate import score_records, score_store
from probes.extract import FeatureStore
from probes.train import split_rows
from tests.probes.tiny_pipeline import tiny_build_config


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildConfig, str]:
    config = tiny_build_config(tmp_path_factory.mktemp("tiny_build"))
    return config, build(config)


def test_build_writes_a_verified_artifact(tiny_build: tuple[BuildConfig, str]) -> None:
    config, sha = tiny_build
    probe = load_probe(config.out, expected_sha256=sha)
    manifest = probe.manifest
    assert manifest.fingerprint.num_layers == 2 and manifest.fingerprint.mlp_width == 64
    assert manifest.prompt.max_new_tokens == 6
    assert manifest.training["model_spec"] == config.model
    assert "balanced" in manifest.training["class_balance"]
    assert len(manifest.training["dataset_sha256"]) == 64
    assert set(manifest.validation_risk_quantiles) >= {"0.1", "0.5", "0.9", "0.99"}
    assert manifest.thresholds.flag <= manifest.thresholds.abstain
    assert {"flag", "abstain"} <= set(manifest.thresholds.goals)
    assert manifest.scoring.stacker is not None
    assert {"report.json", SKLEARN_FILE, "test.roc.png"} <= set(manifest.files)
    assert "test" in manifest.evaluation and "auroc_ci95" in manifest.evaluation["test"]["probe"]
    assert manifest.scope is not None and SCOPE_FILE in manifest.files
    assert probe.scope is not None and probe.scope.weights.size == manifest.scope.hidden_size
    assert 0.0 <= manifest.scope.evaluation["val_questions_in_scope"] <= 1.0


def test_build_report_times_every_stage(tiny_build: tuple[BuildConfig, str]) -> None:
    config, _ = tiny_build
    report = json.loads((config.out / "report.json").read_text())
    stages = {"load_model", "load_questions", "collect", "extract", "train", "scope_gate"}
    stages |= {"evaluate"}
    assert stages <= set(report["timings"])
    assert report["peak_rss_mb"] > 0 and report["wall_s"] > 0
    assert report["sparsity_curve"] and "val" in report["sparsity_curve"][0]
    assert all(n["weight"] > 0 for n in report["h_neurons"])


def test_rebuild_resumes_and_reproduces(tiny_build: tuple[BuildConfig, str]) -> None:
    config, sha = tiny_build
    again = build(config.model_copy(update={"out": config.out.parent / "again"}))
    first = load_probe(config.out, expected_sha256=sha)
    second = load_probe(config.out.parent / "again", expected_sha256=again)
    np.testing.assert_array_equal(first.weights.weights, second.weights.weights)
    assert first.manifest.scoring == second.manifest.scoring


def test_export_drops_the_pickle_and_still_verifies(
    tiny_build: tuple[BuildConfig, str], tmp_path: Path
) -> None:
    config, _ = tiny_build
    sha = export_probe(config.out, tmp_path / "shipped")
    shipped = load_probe(tmp_path / "shipped", expected_sha256=sha)
    assert SKLEARN_FILE not in shipped.manifest.files
    assert not (tmp_path / "shipped" / SKLEARN_FILE).exists()
    assert "report.json" in shipped.manifest.files
    assert shipped.scope is not None and shipped.manifest.scope is not None  # the gate travels


def test_token_by_token_scoring_equals_feature_scoring(tiny_build: tuple[BuildConfig, str]) -> None:
    """The runtime path (teacher-forced tokens, only the probe's neurons) gives the same
    risk as the training path (mean features from the store)."""
    from guard.model import load_model

    config, _ = tiny_build
    probe = load_probe(config.out)
    store = FeatureStore(config.resolved_work_dir)
    rows = split_rows(store, "test")
    from_store = score_store(probe, store, rows)
    answers = read_answers(config.resolved_work_dir / "answers.jsonl")
    records = [answers[store.ids[r]] for r in rows]
    loaded = load_model(config.model)
    from_tokens, empty = score_records(loaded, probe, records, batch_size=8)
    assert empty == 0
    assert RiskScorer(probe).neuron_selection()
    np.testing.assert_allclose(from_tokens.probe_logit, from_store.probe_logit, atol=1e-4)
    for name, values in from_store.stats.items():
        np.testing.assert_allclose(from_tokens.stats[name], values, rtol=1e-4, atol=1e-4)
    # a random model's near-constant entropies get large stacker weights: compare loosely
    np.testing.assert_allclose(from_tokens.risk, from_store.risk, atol=1e-2)
    np.testing.assert_array_equal(from_tokens.labels, from_store.labels)


@pytest.mark.slow
def test_real_build_on_300_triviaqa_questions(tmp_path: Path) -> None:
    """Issue 2's CI run: the whole pipeline on the real model, >= 300 questions."""
    from tests.conftest import TRIVIAQA

    config = BuildConfig(
        dataset=Path(TRIVIAQA),
        out=tmp_path / "probe",
        limit=300,
        sparsity_curve=False,
    )
    sha = build(config)
    probe = load_probe(config.out, expected_sha256=sha)
    test = probe.manifest.evaluation["test"]
    assert test["n"] >= 30 and 0 < test["hallucinated"] < test["n"]
    assert 0.0 <= test["probe"]["auroc"] <= 1.0
    assert probe.weights.weights.size > 0
    report = json.loads((config.out / "report.json").read_text())
    assert report["timings"]["collect"]["wall_s"] > 0
    scope = probe.manifest.scope
    assert scope is not None and scope.hidden_size == 576
    assert scope.evaluation["val_questions_in_scope"] >= 0.9
    assert scope.evaluation["open_prompts_rejected_oof"] >= 0.5  # a gate that separates


def test_shipped_default_probe_is_small_pinned_and_described() -> None:
    from guard.model import SMOLLM2_MODEL_ID
    from guard.probe import DEFAULT_PROBE_DIR, DEFAULT_PROBE_SHA256

    probe = load_probe("default")
    assert probe.manifest_sha256 == DEFAULT_PROBE_SHA256
    manifest = probe.manifest
    assert manifest.model_id == SMOLLM2_MODEL_ID
    assert manifest.training["model_spec"] == "smollm2"
    assert SKLEARN_FILE not in manifest.files
    assert sum(p.stat().st_size for p in DEFAULT_PROBE_DIR.iterdir()) < 2_000_000
    quantiles = [manifest.validation_risk_quantiles[q] for q in ("0.1", "0.5", "0.9", "0.99")]
    assert quantiles == sorted(quantiles)
    assert manifest.thresholds.goals["abstain"]["coverage"] > 0
    assert int((probe.weights.weights > 0).sum()) == manifest.training["h_neurons"] > 0
    assert manifest.scope is not None and probe.scope is not None
    assert manifest.scope.evaluation["val_questions_in_scope"] >= 0.98


@pytest.mark.slow
def test_default_probe_verifies_against_the_embedded_model(smollm2) -> None:  # type: ignore[no-untyped-def]
    load_probe("default").verify_model(smollm2.fingerprint)
