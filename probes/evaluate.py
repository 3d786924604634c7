"""Evaluate a probe against the free baselines: scoring answers, the report, the CLI.

Two ways in, one scoring path (`guard.scoring.RiskScorer`, the code the runtime uses):
- `score_store`: answers already in a feature store (the build's val/test splits);
  the mean CETT of an answer is fed to ``RiskScorer.measure`` as a one-token answer,
  which is exact because the probe is linear in CETT.
- `evaluate_probe` (``hguard probes evaluate``): fresh greedy answers with the probe's
  prompt recipe, judged, teacher-forced with `guard.forcing.teacher_force` capturing
  only the probe's neurons, then scored token by token.

`build_report` writes ``metrics.probe`` (the served, calibrated risk), its parts
(``cett_only``: the probe logit; ``logit_stack``: the stacker's statistics part) and the
baselines, each with ``auroc_ci95``, plus ``served_minus_best_baseline`` (paired
bootstrap) and a length-controlled check.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from guard.probe import STAT_NAMES, Probe, load_probe
from guard.scoring import AnswerStats, RiskScorer
from probes.metrics import (
    BASELINE_SIGNS,
    ScoredAnswers,
    length_controlled,
    nan_to_none,
    paired_auroc_difference,
    score_metrics,
    threshold_summary,
)
from probes.train import FeatureSource

log = logging.getLogger(__name__)


def _score_stats(scorer: RiskScorer, labels: np.ndarray, stats: list[AnswerStats]) -> ScoredAnswers:
    z = np.array([scorer.stack(s) for s in stats], dtype=np.float64)
    return ScoredAnswers(
        labels=np.asarray(labels, dtype=np.int64),
        risk=np.array([scorer.answer_risk(s) for s in stats], dtype=np.float64),
        z=z,
        probe_logit=np.array([s.probe_logit for s in stats], dtype=np.float64),
        stats={
            name: np.array([s.stat(name) for s in stats], dtype=np.float64) for name in STAT_NAMES
        },
    )


def store_columns(scorer: RiskScorer, width: int) -> np.ndarray:
    """Feature-store columns of the probe's neurons, in the scorer's capture order."""
    columns = [
        layer * width + neuron
        for layer, neurons in scorer.neuron_selection().items()
        for neuron in neurons
    ]
    return np.asarray(columns, dtype=np.int64)


def score_store(probe: Probe, store: FeatureSource, rows: np.ndarray) -> ScoredAnswers:
    """Score answers of a feature store (rows with at least one response token)."""
    scorer = RiskScorer(probe)
    columns = store_columns(scorer, store.width)
    features = torch.from_numpy(  # [answers, K] in capture order
        np.asarray(store.load("resp_mean", rows=rows, columns=columns), dtype=np.float32)
    )
    logits = scorer.measure(features)[:, 0].double().numpy()
    meta = store.meta
    stats = [
        AnswerStats(
            probe_logit=float(logits[i]),
            length=int(meta["length"][r]),
            mean_logprob=float(meta["mean_logprob"][r]),
            min_logprob=float(meta["min_logprob"][r]),
            mean_entropy=float(meta["mean_entropy"][r]),
            max_entropy=float(meta["max_entropy"][r]),
        )
        for i, r in enumerate(rows)
    ]
    labels = np.asarray(meta["label"])[rows]
    return _score_stats(scorer, labels, stats)


def build_report(scored: ScoredAnswers, probe: Probe, *, seed: int = 0) -> dict[str, Any]:
    """The evaluation JSON: ``n``, ``hallucinated``, ``metrics`` and comparisons."""
    y = scored.labels
    metrics: dict[str, Any] = {"probe": score_metrics(y, scored.risk, calibrated=True, seed=seed)}
    metrics["cett_only"] = score_metrics(y, scored.probe_logit, calibrated=False, seed=seed)
    stacker = probe.manifest.scoring.stacker
    if stacker is not None:
        stack_part = scored.z - stacker.probe_coef * scored.probe_logit
        metrics["logit_stack"] = score_metrics(y, stack_part, calibrated=False, seed=seed)
    for name, sign in BASELINE_SIGNS.items():
        metrics[name] = score_metrics(y, sign * scored.stats[name], calibrated=False, seed=seed)
    best = max(BASELINE_SIGNS, key=lambda name: _finite(metrics[name]["auroc"]))
    thresholds = probe.manifest.thresholds
    report = {
        "n": scored.n,
        "hallucinated": int(y.sum()),
        "base_accuracy": float(1 - y.mean()) if y.size else None,
        "metrics": metrics,
        "best_baseline": best,
        "served_minus_best_baseline": paired_auroc_difference(
            y, scored.risk, BASELINE_SIGNS[best] * scored.stats[best], seed=seed
        ),
        "length_controlled": {
            "probe": length_controlled(y, scored.risk, scored.stats["length"]),
            best: length_controlled(
                y, BASELINE_SIGNS[best] * scored.stats[best], scored.stats["length"]
            ),
        },
        "thresholds": {
            "flag": threshold_summary(y, scored.risk, thresholds.flag),
            "abstain": threshold_summary(y, scored.risk, thresholds.abstain),
        },
    }
    return dict(nan_to_none(report))


def _finite(value: float) -> float:
    return value if np.isfinite(value) else -np.inf


class EvaluateConfig(BaseModel):
    """``hguard probes evaluate``: which probe, which questions, where to write."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probe: str = "default"
    dataset: Path
    out: Path
    limit: int | None = Field(default=None, ge=1)
    split: Literal["train", "val", "test", "all"] = "all"
    batch_size: int = Field(default=32, ge=1)
    model: str | None = None  # default: the probe's model (guard.loading.model_spec_of)
    answers: Path | None = None  # answers JSONL to reuse/extend (default: next to ``out``)
    seed: int = 0


def score_records(
    loaded: Any, probe: Probe, records: list[Any], batch_size: int
) -> tuple[ScoredAnswers, int]:
    """Teacher-force answer records with the probe's neurons; ``(scored, empty answers)``.

    Answers without a response token cannot be scored and are left out (counted). Batches
    are length-sorted (`probes.longform.trace_answers`); the scores keep the records' order.
    """
    from probes.longform import trace_answers

    scorer = RiskScorer(probe)
    kept = [r for r in records if r.response_ids]
    stats = [trace.stats() for trace in trace_answers(loaded, scorer, kept, batch_size)]
    labels = np.array([1 if r.hallucinated else 0 for r in kept], dtype=np.int64)
    return _score_stats(scorer, labels, stats), len(records) - len(kept)


def evaluate_probe(config: EvaluateConfig) -> dict[str, Any]:
    """The ``hguard probes evaluate`` contract (issue 2): answer, judge, score, report."""
    from guard.loading import model_spec_of
    from guard.model import load_model
    from probes.collect import collect_answers
    from probes.datasets import load_questions, split_of

    started = time.perf_counter()
    probe = load_probe(config.probe)
    spec = config.model or model_spec_of(probe)
    loaded = load_model(spec)
    probe.verify_model(loaded.fingerprint)
    items = load_questions(config.dataset)
    if config.split != "all":
        items = [item for item in items if split_of(item.id) == config.split]
    items = items[: config.limit] if config.limit is not None else items
    config.out.parent.mkdir(parents=True, exist_ok=True)
    answers_path = config.answers or config.out.with_name(config.out.stem + ".answers.jsonl")
    records = collect_answers(
        loaded, items, answers_path, probe.manifest.prompt, batch_size=config.batch_size
    )
    scored, empty = score_records(loaded, probe, records, config.batch_size)
    report = build_report(scored, probe, seed=config.seed)
    report.update(
        {
            "dataset": str(config.dataset),
            "split": config.split,
            "questions": len(items),
            "empty_answers": empty,
            "probe": {"name": probe.name, "path": str(probe.path), "sha256": probe.manifest_sha256},
            "model": spec,
            "wall_s": time.perf_counter() - started,
        }
    )
    write_report(report, config.out, scored, probe)
    return report


def write_report(report: dict[str, Any], out: Path, scored: ScoredAnswers, probe: Probe) -> None:
    """The JSON report, and its plots next to it (``<stem>.<plot>.png``)."""
    from probes.plots import save_plots

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    save_plots(scored, probe, out.parent, prefix=out.stem + ".")
    log.info(
        "wrote %s (n=%d, probe AUROC %s)", out, report["n"], report["metrics"]["probe"]["auroc"]
    )
