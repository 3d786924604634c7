"""Issue 11: a lower-false-alarm profile for the shipped knowledge gate (v7): the answer
flag line and the gate's prompt flag line chosen together on sets already read, then
measured once on a clean set.

The default verdict (the answer risk at the manifest's flag line, the gate reporting only)
flags 15-18% of the model's correct TriviaQA test answers, over the issue's 10%, and passes
most made-up long answers; with the gate acting at its own lines it catches most of those
and flags a few more correct answers. The profile acts on the gate
(``GUARD_KNOWLEDGE_GATE=true``) with both lines moved. The v4 gate had such a profile
(`bench/knowledge_answers.py`, ``prompt`` signal); its prompt line means nothing for a
refitted gate, so it is chosen again here, with the server's own prompt risks.

- Signals per answer: the answer risk (mean pooling, `RiskScorer`, as served) and the
  ``prompt_risk`` the server computes (``<set>.prompt_risk.json``, written by
  `bench/knowledge_tokens.py --stage score` with the shipped gate). An answer counts as
  flagged when its prompt is in scope and either reaches its line.
- Dev sets, all read before (none held out): held-out sets 5-8's answers, pooled, and the
  model's TriviaQA validation answers. Rule (`knowledge_answers.search_lines`): the lines
  flag at most 10% of the correct TriviaQA validation answers and of the sets' real-entity
  answers, short and long each; among those, the most made-up answers (short and long
  shares averaged). Abstain lines: the manifest's where they are at or over the chosen flag
  line, else 0.99. Frozen (``knowledge_profile_frozen.json``) before the test set is read.
- Test, read once: held-out set 9 (`bench/data/madeup_heldout9.jsonl`, written by a helper
  that saw none of the project) and the TriviaQA test answers.

    python bench/knowledge_tokens.py --stage score --work DIR        # every answer dir
    python bench/knowledge_profile.py --stage fit --heldout work-set5 ... work-set8 --tqa DEV
    python bench/knowledge_profile.py --stage test --heldout work-set9 --tqa TEST
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from knowledge_answers import (  # noqa: E402
    HELDOUT_SETS,
    answers,
    groups,
    search_lines,
    served_lines,
    shares,
    sizes,
)

RESULTS = Path(__file__).resolve().parents[1] / "bench/results"
ABSTAIN_FALLBACK = 0.99
SHIP_RULE = (
    "the profile is documented as a setting (README, 'Long answers and made-up entities'); "
    "it becomes the served default only if, on set 9 and the TriviaQA test answers read "
    "once after this freeze, it flags at most 10% of the model's correct TriviaQA test "
    "answers and of set 9's real-entity answers (short and long each) and also meets the "
    "issue's made-up targets (>= 95% of short, >= 90% of long made-up answers)"
)

Sets = dict[str, dict[str, np.ndarray]]


def pooled(heldout: list[Path], tqa: Path, split: str) -> tuple[Sets, dict[str, str]]:
    """The answer sets of ``groups(split)``: each held-out set's arrays concatenated over
    the ``heldout`` directories, the TriviaQA ones from ``tqa``."""
    form = groups(split)
    per_dir = [answers({name: work for name in HELDOUT_SETS}, ("prompt",)) for work in heldout]
    sets = {
        name: {key: np.concatenate([d[name][key] for d in per_dir]) for key in per_dir[0][name]}
        for name in HELDOUT_SETS
    }
    tqa_names = [name for name in form.values() if name not in HELDOUT_SETS]
    sets.update(answers({name: tqa for name in tqa_names}, ("prompt",)))
    wrong = {k.replace("correct", "wrong"): n for k, n in form.items() if k.startswith("correct")}
    return sets, {**form, **wrong}


def verdicts(sets: Sets, form: dict[str, str], profile: dict[str, Any]) -> dict[str, Any]:
    """Flagged shares under the default, the gate acting at its own lines, and the profile."""
    answer_line, prompt_logit = served_lines()
    return {
        "default (answer risk alone, shipped line)": shares(
            sets, form, "prompt", (answer_line, None)
        ),
        "gate acting, shipped lines": shares(sets, form, "prompt", (answer_line, prompt_logit)),
        "profile": shares(sets, form, "prompt", (profile["risk_line"], profile["logit_line"])),
    }


def settings(risk_line: float, logit_line: float) -> dict[str, str]:
    """The profile as the server's environment variables."""
    from guard.probe import load_probe

    manifest = load_probe("default").manifest
    assert manifest.knowledge is not None
    prompt_line = float(1 / (1 + np.exp(-logit_line)))
    abstain = manifest.thresholds.abstain
    prompt_abstain = manifest.knowledge.abstain
    return {
        "GUARD_KNOWLEDGE_GATE": "true",
        "GUARD_FLAG_THRESHOLD": f"{risk_line:.4f}",
        "GUARD_ABSTAIN_THRESHOLD": f"{abstain if abstain >= risk_line else ABSTAIN_FALLBACK:.4f}",
        "GUARD_PROMPT_FLAG_THRESHOLD": f"{prompt_line:.4f}",
        "GUARD_PROMPT_ABSTAIN_THRESHOLD": (
            f"{prompt_abstain if prompt_abstain >= prompt_line else ABSTAIN_FALLBACK:.4f}"
        ),
    }


def fit_stage(heldout: list[Path], tqa: Path, frozen: Path) -> dict[str, Any]:
    sets, form = pooled(heldout, tqa, "val")
    rule_form = {k: v for k, v in form.items() if not k.startswith("wrong")}
    best, _ = search_lines(sets, rule_form, ("prompt",))
    if best["risk_line"] is None or best["logit_line"] is None:
        raise SystemExit(f"the rule switched a signal off ({best}): no profile to serve")
    report = {
        "what": "issue 11: a lower-false-alarm profile for the shipped knowledge gate: the "
        "answer flag line and the prompt flag line, chosen together on sets already read "
        f"({', '.join(d.name for d in heldout)} and {tqa.name}'s TriviaQA validation "
        "answers); frozen before set 9 is read",
        "frozen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rule": "flag at most 10% of correct TriviaQA validation answers and of the dev sets' "
        "real-entity answers, short and long each; the most made-up answers flagged",
        "chosen": best,
        "settings": settings(best["risk_line"], best["logit_line"]),
        "on_dev": verdicts(sets, form, best),
        "ship_rule": SHIP_RULE,
        "dev_counts": {k: int(len(sets[n]["risk"])) for k, n in rule_form.items()},
        "dev_correct": {
            k: int(sets[n]["correct"].sum()) for k, n in form.items() if k.startswith("correct")
        },
    }
    frozen.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def test_stage(heldout: Path, tqa: Path, frozen: Path, out: Path) -> dict[str, Any]:
    design = json.loads(frozen.read_text(encoding="utf-8"))
    sets, form = pooled([heldout], tqa, "test")
    report = {
        "what": f"the knowledge profile (frozen {design['frozen_at']}) on {heldout.name}'s "
        "held-out set and the TriviaQA test answers, read once",
        "read_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": design["settings"],
        "verdicts": verdicts(sets, form, design["chosen"]),
        **sizes(sets, form),
        "ship_rule": design["ship_rule"],
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("fit", "test"), required=True)
    parser.add_argument(
        "--heldout", type=Path, nargs="+", required=True, help="answer dirs of held-out sets"
    )
    parser.add_argument("--tqa", type=Path, required=True, help="TriviaQA val (fit) / test answers")
    parser.add_argument("--frozen", type=Path, default=RESULTS / "knowledge_profile_frozen.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "knowledge_profile_test.json")
    args = parser.parse_args(argv)
    if args.stage == "fit":
        report = fit_stage(args.heldout, args.tqa, args.frozen)
    elif len(args.heldout) != 1:
        raise SystemExit("--stage test reads one held-out set")
    else:
        report = test_stage(args.heldout[0], args.tqa, args.frozen, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
