"""The report half of `bench/longform_analysis.py`: the design selection rule and the table."""

from __future__ import annotations

from typing import Any

import numpy as np

SELECTION_RULE = (
    "validation only: among designs whose TriviaQA validation short-answer AUROC is within "
    "0.01 of the served mean's, the highest mean of made-up validation recall (short, long; "
    "no gate) at its own threshold; ties go to the simpler (earlier) design"
)


def select_design(designs: dict[str, Any]) -> dict[str, Any]:
    """The design chosen on validation data by `SELECTION_RULE` (frozen before held-out)."""
    served = designs["mean (served today)"]["tqa_short_val"]["auroc"]["auroc"]
    rows = {}
    for design, entry in designs.items():
        rows[design] = {
            "val_short_auroc": entry["tqa_short_val"]["auroc"]["auroc"],
            "val_long_auroc": entry["tqa_long_val"]["auroc"]["auroc"],
            "madeup_val_recall": float(
                np.mean(
                    [
                        entry[n]["no_gate"]["flagged"]
                        for n in ("madeup_val_short", "madeup_val_long")
                    ]
                )
            ),  # fmt: skip
            "known_long_flagged": entry.get("known_long", {}).get("no_gate", {}).get("flagged"),
        }
    eligible = [d for d, r in rows.items() if r["val_short_auroc"] >= served - 0.01]
    chosen = max(eligible, key=lambda d: rows[d]["madeup_val_recall"])
    return {"rule": SELECTION_RULE, "candidates": rows, "chosen": chosen}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def markdown_table(report: dict[str, Any], gate: str) -> str:
    """Designs x headline figures (made-up recall under ``gate``; AUROCs with 95% CI)."""
    made = [n for n in ("heldout_short", "heldout_long") if n in report["sets"]] or [
        "madeup_val_short", "madeup_val_long"
    ]  # fmt: skip
    head = [f"{n} flagged" for n in made] + [
        "TQA correct flagged (short / long)", "TQA short AUROC", "NQ AUROC", "long-form AUROC",
        "long - best baseline",
    ]  # fmt: skip
    lines = ["| design | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    long_form = report.get("long_form_test", {})
    for design, entry in report["designs"].items():
        cells = [_pct(entry[n][gate]["flagged"]) for n in made]
        short, long = entry.get("tqa_short_test"), entry.get("tqa_long_test")
        cells.append(
            f"{_pct(short['no_gate']['correct_flagged']) if short else 'n/a'} / "
            f"{_pct(long['no_gate']['correct_flagged']) if long else 'n/a'}"
        )
        for name in ("tqa_short_test", "nq_short"):
            a = entry.get(name, {}).get("auroc")
            cells.append("n/a" if not a else f"{a['auroc']:.3f}")
        lf = long_form.get("designs", {}).get(design)
        cells.append("n/a" if not lf else f"{lf['auroc']:.3f} [{lf['auroc_ci95'][0]:.3f}, "
                     f"{lf['auroc_ci95'][1]:.3f}]")  # fmt: skip
        diff = long_form.get("minus_best_baseline", {}).get(design)
        cells.append("n/a" if not diff else f"{diff['difference']:+.3f} [{diff['ci95'][0]:+.3f}, "
                     f"{diff['ci95'][1]:+.3f}]")  # fmt: skip
        lines.append(f"| {design} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
