"""Quality benchmark of the shipped probe: TriviaQA test split and NQ-open dev, one JSON.

    python bench/quality.py --out runs/quality.json [--limit N] [--probe NAME|DIR]
    python bench/quality.py --probe gemma3-270m-triviaqa --out runs/gemma.json \
        --features-triviaqa runs/gemma-work/features   # NQ-open: fresh answers

Each dataset goes through ``hguard probes evaluate`` (`probes.evaluate.evaluate_probe`):
fresh greedy answers with the probe's prompt recipe, judged, scored by the runtime's
`RiskScorer`, compared with every free baseline, with bootstrap intervals. Answers are
kept in ``<out stem>.<dataset>.answers.jsonl`` (resumable; ``--answers-dir`` points at
earlier answer files of the same model and recipe to reuse them). A dataset given as a
build's stored features (``--features-*``) is scored from them instead (same answers, same
`RiskScorer`); the others are answered afresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS: dict[str, tuple[Path, Literal["test", "all"]]] = {
    "triviaqa_test": (DATA / "triviaqa" / "triviaqa.jsonl", "test"),
    "nq_open_dev": (DATA / "nq_open" / "nq_open_dev.jsonl", "all"),
}
SUMMARY_METRICS = ("probe", "cett_only", "logit_stack", "max_entropy", "min_logprob", "length")


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one dataset's report."""
    metrics = report["metrics"]
    row: dict[str, Any] = {
        "n": report["n"],
        "hallucinated": report["hallucinated"],
        "best_baseline": report["best_baseline"],
        "served_minus_best_baseline": report["served_minus_best_baseline"],
        "ece": metrics["probe"].get("ece"),
        "thresholds": report["thresholds"],
    }
    for name in (*SUMMARY_METRICS, report["best_baseline"]):
        if name in metrics:
            row[name] = {"auroc": metrics[name]["auroc"], "auroc_ci95": metrics[name]["auroc_ci95"]}
    return row


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """A README-ready table: AUROC [95% CI] per signal and dataset, plus ECE."""

    def cell(entry: dict[str, Any] | None) -> str:
        if not entry or entry.get("auroc") is None:
            return "n/a"
        lo, hi = entry["auroc_ci95"]
        return f"{entry['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"

    names = list(summary)
    lines = ["| signal | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in SUMMARY_METRICS:
        lines.append(
            f"| {metric} | " + " | ".join(cell(summary[n].get(metric)) for n in names) + " |"
        )
    diffs = []
    for n in names:
        d = summary[n]["served_minus_best_baseline"]
        diffs.append(f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    lines.append("| served - best baseline | " + " | ".join(diffs) + " |")
    lines.append(
        "| ECE (served) | "
        + " | ".join(
            f"{summary[n]['ece']:.3f}" if summary[n]["ece"] is not None else "n/a" for n in names
        )
        + " |"
    )
    lines.append(
        "| answers (hallucinated) | "
        + " | ".join(f"{summary[n]['n']} ({summary[n]['hallucinated']})" for n in names)
        + " |"
    )
    return "\n".join(lines)


def stored_features(args: argparse.Namespace) -> dict[str, Path]:
    """The datasets given as stored feature directories."""
    given = {"triviaqa_test": args.features_triviaqa, "nq_open_dev": args.features_nq}
    return {name: path for name, path in given.items() if path is not None}


def from_features(args: argparse.Namespace) -> dict[str, Any]:
    """Reports from feature stores already extracted by the build (no generation).

    Same answers, same `RiskScorer` as the live path (tests/probes/test_build.py checks
    that the two agree); ``--limit`` takes the first N answers of each set.
    """
    import numpy as np

    from guard.probe import load_probe
    from probes.evaluate import build_report, score_store
    from probes.extract import FeatureStore
    from probes.train import split_rows

    probe = load_probe(args.probe)
    reports: dict[str, Any] = {}
    for name, directory in stored_features(args).items():
        store = FeatureStore(directory)
        if name == "triviaqa_test":
            rows = split_rows(store, "test")
        else:
            rows = np.flatnonzero(np.asarray(store.meta["length"]) > 0)
        rows = rows[: args.limit] if args.limit else rows
        report = build_report(score_store(probe, store, rows), probe)
        report["source"] = f"stored features {directory} (answers collected by the build)"
        report["probe"] = {"name": probe.name, "sha256": probe.manifest_sha256}
        reports[name] = report
    return reports


def from_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh greedy answers through ``hguard probes evaluate`` for each dataset."""
    from probes.evaluate import EvaluateConfig, evaluate_probe

    out: Path = args.out
    reports: dict[str, Any] = {}
    for name, (dataset, split) in DATASETS.items():
        if name in stored_features(args):
            continue
        answers = (args.answers_dir or out.parent) / f"{out.stem}.{name}.answers.jsonl"
        config = EvaluateConfig(
            probe=args.probe,
            dataset=dataset,
            out=out.parent / f"{out.stem}.{name}.json",
            split=split,
            limit=args.limit,
            batch_size=args.batch_size,
            answers=answers,
        )
        reports[name] = evaluate_probe(config)
    return reports


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    started = time.perf_counter()
    stored = stored_features(args)
    reports = {**from_features(args), **from_generation(args)}
    summary = {name: summarize(report) for name, report in reports.items()}
    result = {
        "probe": next(iter(reports.values()))["probe"],
        "mode": {
            name: "stored features" if name in stored else "fresh generation" for name in reports
        },  # fmt: skip
        "limit": args.limit,
        "wall_s": time.perf_counter() - started,
        "summary": summary,
        "table": markdown_table(summary),
        "reports": reports,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="result JSON")
    parser.add_argument("--limit", type=int, help="first N questions of each dataset (split)")
    parser.add_argument("--probe", default="default", help="shipped probe name or directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--answers-dir", type=Path, help="where answer files live (resumable)")
    parser.add_argument("--features-triviaqa", type=Path, help="score a build's stored features")
    parser.add_argument("--features-nq", type=Path, help="stored NQ-open features (same model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
