"""``hguard probes build``: questions to a verified probe artifact, with its report.

Stages (each timed, with the process's peak RSS, in ``report.json``): load the model,
load the questions, collect greedy answers (resumable JSONL in the work directory),
extract CETT features (resumable shards), train (`probes.train`, `probes.calibration`),
evaluate on the validation and test splits (`probes.evaluate`, the runtime's
`RiskScorer`), save with `guard.probe.save_probe`. The manifest's sha256 is printed
and returned: pin it (``GUARD_PROBE_SHA256``, or ``DEFAULT_PROBE_SHA256`` when shipping).

    sha = build(BuildConfig(dataset=Path("triviaqa.jsonl"), out=Path("probe"), limit=300))
"""

from __future__ import annotations

import io
import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import joblib

from guard.errors import ProbeError
from guard.model import model_name
from guard.probe import (
    KNOWLEDGE_FILE,
    SCOPE_FILE,
    SKLEARN_FILE,
    WEIGHTS_FILE,
    GateWeights,
    Probe,
    ProbeManifest,
    ScopeRecipe,
    load_probe,
    save_probe,
    sha256_file,
)
from probes.assemble import TrainedProbe, assemble_probe, train_served_probe
from probes.config import BuildConfig
from probes.evaluate import ScoredAnswers, build_report, score_store
from probes.train import FeatureSource, split_rows

log = logging.getLogger(__name__)

SPARSITY_C = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def peak_rss_mb() -> float:
    """Peak resident set size of this process and its finished children, in MiB (Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


@contextmanager
def stage(name: str, timings: dict[str, Any]) -> Iterator[None]:
    """Record a stage's wall time, CPU time (all threads of this process: what a contended
    machine does not inflate) and the peak RSS after it into ``timings``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    log.info("stage %s ...", name)
    yield
    timings[name] = {
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(time.process_time() - cpu_started, 2),
        "peak_rss_mb": peak_rss_mb(),
    }
    log.info(
        "stage %s done in %.1f s (peak RSS %.0f MiB)", name, timings[name]["wall_s"], peak_rss_mb()
    )


def collect_and_extract(
    config: BuildConfig, timings: dict[str, Any]
) -> tuple[BuildConfig, Any, list[Any], FeatureSource]:
    """Load the model and questions, collect answers, extract features (all resumable).
    Returns the config with its prompt recipe decided for the model."""
    from guard.model import load_model
    from probes.collect import collect_answers
    from probes.datasets import load_questions
    from probes.extract import extract_features

    work = config.resolved_work_dir
    with stage("load_model", timings):
        loaded = load_model(config.model)
    config = config.with_recipe(loaded.tokenizer)
    with stage("load_questions", timings):
        items = load_questions(config.dataset, limit=config.limit)
    with stage("collect", timings):
        records = collect_answers(
            loaded,
            items,
            work / "answers.jsonl",
            config.recipe,
            batch_size=config.batch_size,
            samples=config.samples,
        )
    with stage("extract", timings):
        store = extract_features(loaded, records, work, batch_size=config.batch_size)
    return config, loaded, items, store


def fit_gate(
    config: BuildConfig, loaded: Any, items: list[Any], timings: dict[str, Any]
) -> tuple[ScopeRecipe | None, GateWeights | None]:
    """The scope gate (`probes.scope`) on the train split's questions, thresholded on val."""
    if config.scope is None:
        return None, None
    from probes.datasets import split_of
    from probes.scope import fit_scope_gate

    by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for item in items:
        by_split[split_of(item.id)].append(item.question)
    with stage("scope_gate", timings):
        return fit_scope_gate(
            loaded, by_split["train"], by_split["val"], config.scope, config.recipe
        )


def evaluate_splits(probe: Probe, store: FeatureSource) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reports on the validation and test splits, and their scored answers."""
    reports: dict[str, Any] = {}
    scored: dict[str, ScoredAnswers] = {}
    for split in ("val", "test"):
        rows = split_rows(store, split)
        if rows.size == 0:
            continue
        scored[split] = score_store(probe, store, rows)
        reports[split] = build_report(scored[split], probe)
    return reports, scored


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's short form of one split's report."""
    m = report["metrics"]
    out = {"n": report["n"], "hallucinated": report["hallucinated"]}
    for name in ("probe", "cett_only", "logit_stack", report["best_baseline"]):
        if name in m:
            out[name] = {"auroc": m[name]["auroc"], "auroc_ci95": m[name]["auroc_ci95"]}
    out["probe"].update(ece=m["probe"]["ece"], brier=m["probe"]["brier"])
    out["best_baseline"] = report["best_baseline"]
    out["served_minus_best_baseline"] = report["served_minus_best_baseline"]
    return out


def build(config: BuildConfig) -> str:
    """Run every stage and save the artifact; returns (and prints) the manifest sha256."""
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    config, loaded, items, store = collect_and_extract(config, timings)
    with stage("train", timings):
        trained = train_served_probe(store, config.train)
    scope_recipe, scope_weights = fit_gate(config, loaded, items, timings)
    name = config.name or f"{model_name(config.model)}-{config.dataset.stem}"
    manifest = assemble_probe(trained, loaded, store, config, name)
    manifest = manifest.model_copy(update={"scope": scope_recipe})
    with stage("evaluate", timings):
        draft = Probe(manifest, trained.weights, config.out, "")
        reports, scored = evaluate_splits(draft, store)
        curve = trained_sparsity(store, config) if config.sparsity_curve else []
    manifest = manifest.model_copy(
        update={"evaluation": {split: headline(r) for split, r in reports.items()}}
    )
    total = round(time.perf_counter() - started, 2)
    report = {
        "name": name,
        "timings": timings,
        "wall_s": total,
        "peak_rss_mb": peak_rss_mb(),
        "training": manifest.training,
        "cv": trained.fit.cv.table,
        "h_neurons": trained.h_neurons(store.width),
        "sparsity_curve": curve,
        "thresholds": manifest.thresholds.model_dump(),
        "scope_gate": scope_recipe.model_dump() if scope_recipe is not None else None,
        "evaluation": reports,
    }
    return save_artifact(config, manifest, trained, report, scored, scope_weights)


def trained_sparsity(store: FeatureSource, config: BuildConfig) -> list[dict[str, Any]]:
    from probes.train import sparsity_curve

    targets: dict[str, Any] = {s: (store, split_rows(store, s)) for s in ("val", "test")}
    return sparsity_curve(store, config.train, SPARSITY_C, targets)


def save_artifact(
    config: BuildConfig,
    manifest: ProbeManifest,
    trained: TrainedProbe,
    report: dict[str, Any],
    scored: dict[str, ScoredAnswers],
    scope: GateWeights | None = None,
) -> str:
    """Write the probe directory (manifest, weights, scope gate, report, plots, joblib)."""
    from probes.metrics import nan_to_none
    from probes.plots import save_plots

    plots_dir = config.resolved_work_dir / "plots"
    draft = Probe(manifest, trained.weights, config.out, "")
    extra: dict[str, bytes] = {}
    if "test" in scored:
        for path in save_plots(scored["test"], draft, plots_dir, prefix="test."):
            extra[path.name] = path.read_bytes()
    extra["report.json"] = (json.dumps(nan_to_none(report), indent=2) + "\n").encode()
    if config.save_sklearn:
        buffer = io.BytesIO()
        joblib.dump(trained.sklearn_objects(), buffer)
        extra[SKLEARN_FILE] = buffer.getvalue()
    sha = save_probe(config.out, manifest, trained.weights, extra, scope=scope)
    load_probe(config.out, expected_sha256=sha)  # verify what was written
    print(f"probe written to {config.out}; manifest sha256 {sha}")
    return sha


def export_probe(source: Path, destination: Path, drop: tuple[str, ...] = (SKLEARN_FILE,)) -> str:
    """Copy a verified artifact without some files (e.g. ``probe.joblib`` for shipping)."""
    probe = load_probe(source)
    keep = {
        name: (probe.path / name).read_bytes()
        for name in probe.manifest.files
        if name not in drop and name not in (WEIGHTS_FILE, SCOPE_FILE, KNOWLEDGE_FILE)
    }
    if any(sha256_file(probe.path / n) != probe.manifest.files[n] for n in keep):
        raise ProbeError(f"{source} changed while exporting it")
    manifest = probe.manifest.model_copy(update={"files": {}})
    return save_probe(
        destination, manifest, probe.weights, keep, scope=probe.scope, knowledge=probe.knowledge
    )
