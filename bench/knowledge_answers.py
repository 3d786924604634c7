"""Issue 11 experiment (v5): the knowledge gate read over the answer's tokens too, with the
answer-level lines chosen on sets already read.

Served with v4 acting, held-out set 5's made-up answers were flagged or abstained 88% (short)
and 65% (long) of the time, while 18% / 21% of the model's correct TriviaQA test answers
were (`bench/results/longform_served_v4.json`; targets 95% / 90% and 10%). v4 reads only the
prompt. An answer that invents an entity's facts writes words the model has never seen
("born in Veldoria"), the same kind of token v4 was fitted to fire on (a coined word), so
the same probe, weights unchanged, max-pooled over the answer's tokens may catch what the
prompt did not. Nothing is fitted here: only which signal to add to the answer risk and the
two lines are chosen.

- Signals per answer: the answer risk (mean pooling, `RiskScorer`, as served) and a
  knowledge logit, one of ``prompt`` (v4 as served: the max over the prompt's tokens),
  ``answer`` (the max over the answer's tokens) or ``both`` (the max over every token). An
  answer counts as flagged when its prompt is in scope and either reaches its line.
- Dev sets, all read before (none of them held out): set 5's answers and the model's
  TriviaQA validation answers. Rule: the lines flag at most 10% of the model's correct
  TriviaQA validation answers and at most 10% of set 5's real-entity answers, short and long
  each; among those, the design and lines that flag the most of set 5's made-up answers
  (short and long shares averaged). Frozen (`knowledge_v5_frozen.json`) before the test
  sets' gate tokens are computed.
- Measured with the v4 gate shipped at the time (commit a15ce63); the probe now ships v7,
  so a rerun reads v7's prompt and answer tokens, not the figures recorded here (its
  profile for v7: `bench/knowledge_profile.py`).
- Test, read once: held-out set 6 (`bench/data/madeup_heldout6.jsonl`, written by a helper
  that saw none of the project) and the TriviaQA test answers.

    python bench/longform.py --stage collect --work DEV --sets tqa_short_val tqa_long_val
    python bench/knowledge_answers.py --stage tokens --work DIR       # every answer set
    python bench/knowledge_answers.py --stage fit --heldout work-set5 --tqa DEV
    python bench/knowledge_answers.py --stage test --heldout work-set6 --tqa work-set5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from knowledge_tokens import token_states  # noqa: E402
from longform_analysis import load_set, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results"
SIGNALS = ("prompt", "answer", "both")
FALSE_ALARM = 0.10  # of correct TriviaQA answers and of real-entity answers, per form
HELDOUT_SETS = ("heldout_short", "heldout_long", "heldout_real_short", "heldout_real_long")
SHIP_RULE = (
    "the chosen design replaces the served verdict with the knowledge gate acting (answer "
    "risk at the shipped flag line or v4's prompt risk at its line) if, on set 6 and the "
    "TriviaQA test answers read once after this freeze, it flags more of set 6's made-up "
    "answers (short and long pooled) than that verdict does, and at most 10% of the model's "
    "correct TriviaQA test answers and of set 6's real-entity answers, short and long each; "
    "it acts by default only if it also flags >= 95% of made-up short and >= 90% of made-up "
    "long answers"
)
log = logging.getLogger("knowledge_answers")


def tokens_stage(work: Path, names: list[str] | None) -> None:
    """``<set>.gate_tokens.npz`` beside every ``<set>.answers.jsonl`` of ``work`` (or those
    ``names``): the shipped gate's logit at every prompt and answer token (teacher-forced,
    as the server reads them)."""
    import torch

    from guard.knowledge import KnowledgeGate
    from guard.model import load_model
    from guard.probe import load_probe
    from probes.collect import read_answers

    loaded = load_model()
    gate = KnowledgeGate.from_probe(load_probe("default"), int(loaded.model.config.hidden_size))
    if gate is None or not gate.pooled:
        raise SystemExit("the shipped probe has no pooled (v4) knowledge gate")
    for path in sorted(work.glob("*.answers.jsonl")):
        out = path.with_name(path.name.replace(".answers.jsonl", ".gate_tokens.npz"))
        if out.exists() or (names and path.name.split(".")[0] not in names):
            continue
        records = [r for r in read_answers(path).values() if r.response_ids]
        sequences = [list(r.prompt_ids) + list(r.response_ids) for r in records]
        states = token_states(loaded, sequences, (gate.layer,), batch_size=16)[gate.layer]
        logits = [gate.logits(torch.from_numpy(s)).numpy() for s in states]
        np.savez(
            out,
            ids=np.array([r.id for r in records], dtype=np.str_),
            prompt_len=np.array([len(r.prompt_ids) for r in records]),
            answer_len=np.array([len(r.response_ids) for r in records]),
            logits=np.concatenate(logits).astype(np.float32),
        )
        log.info("%s: %d answers", out.name, len(records))


def knowledge_logits(work: Path, name: str) -> dict[str, dict[str, float]]:
    """Per answer id: the gate's max logit over its prompt's tokens and over its answer's."""
    path = work / f"{name}.gate_tokens.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run --stage tokens --work {work}")
    with np.load(path, allow_pickle=False) as data:
        ids, plen, alen, z = data["ids"], data["prompt_len"], data["answer_len"], data["logits"]
    out, start = {}, 0
    for i, p, a in zip(ids, plen, alen, strict=True):
        row = z[start : start + p + a]
        out[str(i)] = {"prompt": float(row[:p].max()), "answer": float(row[p:].max())}
        start += p + a
    return out


def served_prompt_logits(work: Path, name: str) -> dict[str, dict[str, float]]:
    """Per answer id: the prompt risk as the server computes it (``<set>.prompt_risk.json``,
    `bench/knowledge_tokens.py --stage score`), as a logit: the ``prompt`` signal alone."""
    path = work / f"{name}.prompt_risk.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/knowledge_tokens.py --stage score")
    risks = json.loads(path.read_text(encoding="utf-8"))
    return {i: {"prompt": float(np.log(r / (1 - r)))} for i, r in risks.items()}


def answers(
    names: dict[str, Path], signals: tuple[str, ...] = SIGNALS
) -> dict[str, dict[str, np.ndarray]]:
    """Each set's arrays: the answer risk, the knowledge logits of ``signals``, in scope,
    correct (``signals == ("prompt",)``: read from the served prompt risks, no gate tokens)."""
    import torch

    from guard.probe import load_probe
    from guard.scope import ScopeGate
    from guard.scoring import RiskScorer

    probe = load_probe("default")
    scorer = RiskScorer(probe)
    tokenizer = load_tokenizer(str(probe.manifest.training.get("model_spec", "smollm2")))
    assert probe.scope is not None and probe.manifest.scope is not None
    scope = ScopeGate(probe.scope.weights, probe.scope.bias, probe.manifest.scope.threshold)
    out = {}
    for name, work in names.items():
        s = load_set(work, name, scorer, tokenizer)
        if s is None:
            raise SystemExit(f"{work}/{name}: no answers or traces collected")
        if signals == ("prompt",):
            served = served_prompt_logits(work, name)
            logits = {"prompt": np.array([served[r.id]["prompt"] for r in s.records])}
        else:
            k = knowledge_logits(work, name)
            prompt = np.array([k[r.id]["prompt"] for r in s.records])
            answer = np.array([k[r.id]["answer"] for r in s.records])
            logits = {"prompt": prompt, "answer": answer, "both": np.maximum(prompt, answer)}
        verdicts = scope.judge(torch.as_tensor(s.hidden, dtype=torch.float32))
        out[name] = {
            "risk": s.f["risk_mean"],
            **logits,
            "in_scope": np.array([v.in_scope for v in verdicts]),
            "correct": s.correct,
        }
    return out


def flagged(
    s: dict[str, np.ndarray], signal: str, risk_line: float | None, logit_line: float | None
) -> np.ndarray:
    """In scope and at or over either line (None: that signal off)."""
    off = np.zeros_like(s["in_scope"])
    by_risk = off if risk_line is None else s["risk"] >= risk_line
    by_logit = off if logit_line is None else s[signal] >= logit_line
    return s["in_scope"] & (by_risk | by_logit)


def shares(
    sets: dict[str, dict[str, np.ndarray]],
    form: dict[str, str],
    signal: str,
    lines: tuple[float | None, float | None],
) -> dict[str, float]:
    """Flagged share per group: made-up / real answers of the made-up set, correct (or wrong)
    TriviaQA answers."""
    out = {}
    for key, name in form.items():
        hit = flagged(sets[name], signal, *lines)
        if key.startswith("correct"):
            hit = hit[sets[name]["correct"]]
        elif key.startswith("wrong"):
            hit = hit[~sets[name]["correct"]]
        out[key] = float(hit.mean())
    return out


def sizes(sets: dict[str, dict[str, np.ndarray]], form: dict[str, str]) -> dict[str, Any]:
    """The answers behind each group's share: its set's size, and its correct answers."""
    return {
        "counts": {k: int(len(sets[n]["risk"])) for k, n in form.items()},
        "correct": {
            k: int(sets[n]["correct"].sum()) for k, n in form.items() if k.startswith("correct")
        },
    }


def groups(split: str) -> dict[str, str]:
    return {
        "made_up_short": "heldout_short", "made_up_long": "heldout_long",
        "real_short": "heldout_real_short", "real_long": "heldout_real_long",
        "correct_tqa_short": f"tqa_short_{split}", "correct_tqa_long": f"tqa_long_{split}",
    }  # fmt: skip


def served_lines() -> tuple[float | None, float | None]:
    """The shipped answer flag line and v4's prompt flag line (as a logit)."""
    from guard.probe import load_probe

    probe = load_probe("default")
    assert probe.manifest.knowledge is not None
    flag = probe.manifest.knowledge.flag
    return probe.manifest.thresholds.flag, float(np.log(flag / (1 - flag)))


def _line(value: float) -> float | None:
    return None if np.isinf(value) else float(value)


def search_lines(
    sets: dict[str, dict[str, np.ndarray]], form: dict[str, str], signals: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The rule's search: for every knowledge line of every signal, the lowest answer line
    that flags at most `FALSE_ALARM` of every group of ``form`` but the made-up ones; the
    best row (the most made-up answers, short and long shares averaged) overall and per
    signal."""
    real = [k for k in form if not k.startswith("made_up")]

    def grid(values: np.ndarray) -> np.ndarray:  # inf: that signal off
        return np.r_[np.unique(np.quantile(values, np.linspace(0.3, 1.0, 141))), np.inf]

    risk_grid = grid(np.concatenate([s["risk"] for s in sets.values()]))
    search: list[dict[str, Any]] = []
    for signal in signals:
        for logit_line in grid(np.concatenate([s[signal] for s in sets.values()])):
            for risk_line in risk_grid:  # the lowest answer line the rule allows
                got = shares(sets, form, signal, (risk_line, logit_line))
                if all(got[k] <= FALSE_ALARM for k in real):
                    score = (got["made_up_short"] + got["made_up_long"]) / 2
                    row = {"signal": signal, "risk_line": _line(risk_line),
                           "logit_line": _line(logit_line), "made_up": score, **got}  # fmt: skip
                    search.append(row)
                    break
    per_signal = {
        signal: max((r for r in search if r["signal"] == signal), key=lambda r: r["made_up"])
        for signal in signals
    }
    return max(per_signal.values(), key=lambda r: r["made_up"]), per_signal


def fit_stage(heldout: Path, tqa: Path, frozen: Path) -> dict[str, Any]:
    form = groups("val")
    sets = answers({name: heldout if name.startswith("heldout") else tqa for name in form.values()})
    best, per_signal = search_lines(sets, form, SIGNALS)
    report = {
        "what": "issue 11 experiment v5: the v4 gate's max logit over the prompt, the answer "
        "or both, ORed with the answer risk; design and lines chosen on dev sets already "
        "read (set 5's answers, TriviaQA validation answers); frozen before set 6 is read",
        "frozen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rule": f"flag at most {FALSE_ALARM:.0%} of correct TriviaQA validation answers and of "
        "set 5's real-entity answers, short and long each; the most made-up answers flagged",
        "chosen": best,
        "best_per_signal": per_signal,
        "served_v4_acting_on_dev": shares(sets, form, "prompt", served_lines()),
        "ship_rule": SHIP_RULE,
        "dev_counts": {k: int(len(sets[n]["risk"])) for k, n in form.items()},
        "dev_correct": {
            k: int(sets[n]["correct"].sum()) for k, n in form.items() if k.startswith("correct")
        },  # fmt: skip
    }
    frozen.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def test_stage(heldout: Path, tqa: Path, frozen: Path, out: Path) -> dict[str, Any]:
    design = json.loads(frozen.read_text(encoding="utf-8"))
    form = groups("test")
    sets = answers({name: heldout if name.startswith("heldout") else tqa for name in form.values()})
    chosen = design["chosen"]
    report = {
        "what": f"issue 11 experiment v5 (frozen {design['frozen_at']}) on {heldout.name}'s "
        "held-out set and the TriviaQA test answers, read once",
        "read_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "chosen": {
            **{k: chosen[k] for k in ("signal", "risk_line", "logit_line")},
            **shares(sets, form, chosen["signal"], (chosen["risk_line"], chosen["logit_line"])),
        },  # fmt: skip
        "best_per_signal_at_dev_lines": {
            signal: shares(sets, form, signal, (row["risk_line"], row["logit_line"]))
            for signal, row in design["best_per_signal"].items()
        },
        "served_v4_acting": shares(sets, form, "prompt", served_lines()),
        "answer_risk_alone_at_shipped_line": shares(
            sets, form, "prompt", (served_lines()[0], None)
        ),
        **sizes(sets, form),
        "ship_rule": design["ship_rule"],
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("tokens", "fit", "test"), required=True)
    parser.add_argument("--work", type=Path, help="answer sets to compute gate tokens for")
    parser.add_argument("--sets", nargs="*", help="only these answer sets (--stage tokens)")
    parser.add_argument("--heldout", type=Path, help="the made-up set's answers (heldout_*)")
    parser.add_argument("--tqa", type=Path, help="the TriviaQA answers (tqa_*_val or _test)")
    parser.add_argument("--frozen", type=Path, default=RESULTS / "knowledge_v5_frozen.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "knowledge_v5_test.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage == "tokens":
        if args.work is None:
            raise SystemExit("--stage tokens needs --work")
        import torch

        torch.set_num_threads(args.threads)
        tokens_stage(args.work, args.sets)
        return 0
    if args.heldout is None or args.tqa is None:
        raise SystemExit(f"--stage {args.stage} needs --heldout and --tqa")
    if args.stage == "fit":
        report = fit_stage(args.heldout, args.tqa, args.frozen)
    else:
        report = test_stage(args.heldout, args.tqa, args.frozen, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
