"""The served verdict on long answers and made-up entities (issue 11), as `make serve` gives it.

    python bench/longform.py --stage collect [--heldout --heldout-file FILE --work DIR]
    python bench/knowledge_tokens.py --stage score --work DIR   # prompt risks (shipped gate)
    python bench/longform_served.py --work work-longform --heldout heldout2=DIR ... --out FILE

For every collected answer set: the shipped probe's scope gate on the prompt, its answer
risk (mean pooling, `RiskScorer`) against the manifest's flag and abstain lines, and the
knowledge gate's ``prompt_risk`` (``<set>.prompt_risk.json``, written by
`bench/knowledge_tokens.py --stage score` with the gate the probe ships) against its own
lines. An answer
counts as flagged when the policy's decision is flag or abstain (`guard.policy.Policy`:
judged prompts only, the stricter of the two); ``abstained_before_generation`` counts the
prompts the server does not answer at all. Sets: TriviaQA validation/test (short and long
form), NQ-open (first 1,200), bench/scope.py's prompts, the generator's validation
entities, and the held-out made-up sets (``heldout_*`` in ``--work``: the first; each
``--heldout LABEL=DIR``: a later one, reported as ``LABEL:heldout_*``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from longform_analysis import AnswerSet, auroc_entry, load_set, load_tokenizer  # noqa: E402

from guard.policy import Decision, Policy  # noqa: E402
from guard.probe import load_probe  # noqa: E402
from guard.scope import ScopeGate  # noqa: E402
from guard.scoring import RiskScorer  # noqa: E402
from guard.settings import GuardSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "tqa_short_val", "tqa_long_val", "madeup_val_short", "madeup_val_long", "known_long",
    "tqa_short_test", "tqa_long_test", "nq_short", "scope_short", "scope_long",
    "heldout_short", "heldout_long", "heldout_real_short", "heldout_real_long",
]  # fmt: skip
HELDOUT = ["heldout_short", "heldout_long", "heldout_real_long", "heldout_real_short"]


def served(s: AnswerSet, work: Path, policy: Policy, gate: ScopeGate | None) -> dict[str, Any]:
    """The policy's decisions on one set's answers and what made them."""
    path = work / f"{s.name}.prompt_risk.json"
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: run bench/knowledge_tokens.py --stage score --work {work}"
        )
    risks = json.loads(path.read_text(encoding="utf-8"))
    prompt = np.array([risks[r.id] for r in s.records], dtype=np.float64)
    hidden = torch.as_tensor(s.hidden, dtype=torch.float32)
    scopes = gate.judge(hidden) if gate is not None else [None] * s.n
    answer = s.f["risk_mean"]
    decisions, answer_only, prompt_only, early = [], [], [], []
    for a, p, scope in zip(answer, prompt, scopes, strict=True):
        decisions.append(policy.decide(float(a), scope=scope, prompt_risk=float(p)))
        answer_only.append(policy.decide(float(a), scope=scope))
        prompt_only.append(policy.decide(None, scope=scope, prompt_risk=float(p)))
        early.append(policy.abstains_before(float(p), scope))
    hit = np.array([d is not Decision.PASS for d in decisions])
    out: dict[str, Any] = {
        "n": s.n,
        "in_scope": float(np.mean([scope is None or scope.in_scope for scope in scopes])),
        "flagged_or_abstained": float(hit.mean()),
        "abstained": float(np.mean([d is Decision.ABSTAIN for d in decisions])),
        "by_answer_risk_alone": float(np.mean([d is not Decision.PASS for d in answer_only])),
        "by_prompt_risk_alone": float(np.mean([d is not Decision.PASS for d in prompt_only])),
        "abstained_before_generation": float(np.mean(early)),
        "refusals": int(s.refusal.sum()),
        "flagged_or_refused": float((hit | s.refusal).mean()),
        "prompt_risk_median": float(np.median(prompt)),
    }
    if s.correct.any():
        out["correct_n"] = int(s.correct.sum())
        out["correct_flagged_or_abstained"] = float(hit[s.correct].mean())
        out["correct_flagged_by_answer_alone"] = float(
            np.mean([answer_only[i] is not Decision.PASS for i in np.flatnonzero(s.correct)])
        )
    if s.name.startswith(("tqa", "nq")):
        out["answer_risk_auroc"] = auroc_entry(s.y, answer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work-longform")
    parser.add_argument(
        "--heldout", nargs="*", default=[], metavar="LABEL=DIR", help="later held-out sets"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/longform_served.json")
    parser.add_argument("--probe", default="default", help="shipped probe name or directory")
    args = parser.parse_args(argv)
    probe = load_probe(args.probe)
    if probe.manifest.knowledge is None:
        raise SystemExit("the shipped probe has no knowledge gate")
    policy = Policy.from_probe(probe.manifest.thresholds, GuardSettings(), probe.manifest.knowledge)
    gate = None
    if probe.scope is not None and probe.manifest.scope is not None:
        gate = ScopeGate(probe.scope.weights, probe.scope.bias, probe.manifest.scope.threshold)
    scorer = RiskScorer(probe)
    tokenizer = load_tokenizer(str(probe.manifest.training.get("model_spec", "smollm2")))
    report: dict[str, Any] = {
        "probe_sha256": probe.manifest_sha256,
        "thresholds": policy.thresholds(),
        "scope_threshold": probe.manifest.scope.threshold if probe.manifest.scope else None,
        "sets": {},
    }
    later = [
        (Path(d), HELDOUT, f"{label}:") for label, d in (h.split("=", 1) for h in args.heldout)
    ]
    for work, names, prefix in ((args.work, SETS, ""), *later):
        for name in names:
            s = load_set(work, name, scorer, tokenizer)
            if s is not None:
                report["sets"][prefix + name] = served(s, work, policy, gate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, entry in report["sets"].items():
        correct = entry.get("correct_flagged_or_abstained")
        print(
            f"{name:28s} n={entry['n']:5d} flagged/abstained {entry['flagged_or_abstained']:.3f}"
            f" (answer {entry['by_answer_risk_alone']:.3f}, prompt"
            f" {entry['by_prompt_risk_alone']:.3f}) in scope {entry['in_scope']:.3f}"
            + (f" correct flagged {correct:.3f}" if correct is not None else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
