"""Quality benchmark of the shipped probe: TriviaQA test split and NQ-open dev, one JSON.

    python bench/quality.py --out runs/quality.json [--limit N] [--probe DIR]

Each dataset goes through ``hguard probes evaluate`` (`probes.evaluate.evaluate_probe`):
fresh greedy answers with the probe's prompt recipe, judged, scored by the runtime's
`RiskScorer`, compared with every free baseline, with bootstrap intervals. Answers are
kept in ``<out stem>.<dataset>.answers.jsonl`` (resumable; ``--answers-dir`` points at
earlier answer files of the same model and recipe to reuse them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from probes.evaluate import EvaluateConfig, evaluate_probe

    out: Path = args.out
    started = time.perf_counter()
    reports: dict[str, Any] = {}
    for name, (dataset, split) in DATASETS.items():
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
    summary = {name: summarize(report) for name, report in reports.items()}
    result = {
        "probe": reports["triviaqa_test"]["probe"],
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
    parser.add_argument("--probe", default="default", help="probe directory or 'default'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--answers-dir", type=Path, help="where answer files live (resumable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
