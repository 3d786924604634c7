"""Side-by-side quality and build cost of probes for different models, one JSON and a table.

    python bench/models_table.py --out bench/results/models.json \\
        --model smollm2-135m default bench/results/quality.json \\
        --model gemma3-270m runs/gemma-probe runs/gemma-quality.json

Each ``--model NAME PROBE QUALITY`` takes a probe (shipped name or directory: its
``report.json`` gives H-neurons per layer, build time and peak RSS) and the JSON that
``bench/quality.py`` wrote for it (``-`` when there is none yet: the probe's own report
then gives its TriviaQA test split, and NQ-open stays empty). ``--build NAME JSON`` takes
the build cost from a from-scratch build record (as ``bench/results/build_7000.json``:
``wall_s``, ``peak_rss_kb_time_v``) instead of the report, whose timings may be those of a
resumed build. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: this checkout's guard/

from guard.probe import load_probe  # noqa: E402


def _split(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline of one dataset: served and best-baseline AUROC, ECE, base accuracy."""
    if not summary:
        return None
    best = summary["best_baseline"]
    n, hallucinated = summary["n"], summary["hallucinated"]
    ece = summary.get("ece", summary.get("probe", {}).get("ece"))
    return {
        "n": n,
        "not_hallucinated": (n - hallucinated) / n,
        "served": summary["probe"],
        "best_baseline": {"name": best, **summary[best]},
        "served_minus_best_baseline": summary["served_minus_best_baseline"],
        "ece": ece,
    }


def model_row(
    name: str, probe_spec: str, quality_path: str, build: dict[str, Any] | None = None
) -> dict[str, Any]:
    probe = load_probe(probe_spec)
    report = json.loads((probe.path / "report.json").read_text(encoding="utf-8"))
    quality = None if quality_path == "-" else json.loads(Path(quality_path).read_text())
    if quality is not None:
        summary = quality["summary"]
        trivia, nq = summary.get("triviaqa_test"), summary.get("nq_open_dev")
    else:
        trivia, nq = probe.manifest.evaluation.get("test"), None
    layers = Counter(int(h["layer"]) for h in report["h_neurons"])
    wall, rss = report.get("wall_s"), report.get("peak_rss_mb")
    if build is not None:
        wall, rss = build["wall_s"], build["peak_rss_kb_time_v"] / 1024
    return {
        "model": name,
        "probe": {"name": probe.name, "path": str(probe.path), "sha256": probe.manifest_sha256},
        "quality_source": quality_path,
        "triviaqa_test": _split(trivia),
        "nq_open_dev": _split(nq),
        "neurons": int(probe.weights.weights.size),
        "h_neurons_per_layer": dict(sorted(layers.items())),
        "build_wall_s": wall,
        "build_peak_rss_mb": rss,
        "build_source": "build record" if build is not None else "probe report.json",
        "stages": (build or report).get("stages", report.get("timings")),
        "questions": report.get("training", {}).get("answers"),
    }


def _auroc(entry: dict[str, Any]) -> str:
    lo, hi = entry["auroc_ci95"]
    return f"{entry['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    def cells(fn: Any) -> str:
        return " | ".join(fn(r) for r in rows)

    def split_cells(key: str, fn: Any) -> str:
        return cells(lambda r: fn(r[key]) if r[key] else "not measured")

    lines = [f"| | {cells(lambda r: r['model'])} |", "|---" * (len(rows) + 1) + "|"]
    for key, label in (("triviaqa_test", "TriviaQA test"), ("nq_open_dev", "NQ-open dev")):
        lines += [
            f"| {label}: answers (not hallucinated) | "
            + split_cells(key, lambda s: f"{s['n']} ({s['not_hallucinated']:.1%})") + " |",
            f"| {label}: served AUROC | " + split_cells(key, lambda s: _auroc(s["served"])) + " |",
            f"| {label}: best logit baseline | "
            + split_cells(key, lambda s: f"{s['best_baseline']['name']} "
                          + _auroc(s["best_baseline"])) + " |",
            f"| {label}: served - best | "
            + split_cells(key, lambda s: "{:+.3f} [{:+.3f}, {:+.3f}]".format(
                s["served_minus_best_baseline"]["difference"],
                *s["served_minus_best_baseline"]["ci95"])) + " |",
            f"| {label}: ECE | " + split_cells(key, lambda s: f"{s['ece']:.3f}") + " |",
        ]  # fmt: skip
    lines += [
        "| neurons (H-neurons by layer) | " + cells(lambda r: f"{r['neurons']} ("
            + ", ".join(f"L{k}: {v}" for k, v in r["h_neurons_per_layer"].items()) + ")") + " |",
        "| build: questions, wall, peak RSS | " + cells(lambda r: f"{r['questions']}, "
            f"{r['build_wall_s'] / 60:.1f} min, {r['build_peak_rss_mb'] / 1024:.1f} GiB") + " |",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", nargs=3, action="append", required=True,
                        metavar=("NAME", "PROBE", "QUALITY_JSON"))  # fmt: skip
    parser.add_argument("--build", nargs=2, action="append", default=[],
                        metavar=("NAME", "BUILD_JSON"))  # fmt: skip
    args = parser.parse_args(argv)
    builds = {name: json.loads(Path(path).read_text()) for name, path in args.build}
    rows = [model_row(*spec, build=builds.get(spec[0])) for spec in args.model]
    table = markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": rows, "table": table}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
