"""The analysis half of `bench/longform.py`: answer features, designs, thresholds, figures.

Data discipline: every design is fitted on ``FIT`` sets only (TriviaQA train, generator
seed 0), calibrated and thresholded on ``VAL`` sets only (TriviaQA validation, generator
seed 1); ``TEST`` sets (TriviaQA test, NQ-open) and the held-out made-up set are only
measured. The threshold rule: the lowest flag line at which at most `FALSE_ALARM_VAL` of
the model's *correct* validation answers are flagged, short and long form each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from longform_report import markdown_table, select_design  # bench/ is on sys.path

from guard.probe import STAT_NAMES, load_probe
from guard.scope import ScopeGate
from guard.scoring import RiskScorer
from guard.spans import answer_sentences
from probes.calibration import apply_stacker, fit_calibrator, fit_stacker
from probes.collect import AnswerRecord, read_answers, rejudge
from probes.judge import judge
from probes.knowledge import KnowledgeFit, fit_knowledge_probe
from probes.longform import (
    AnswerTrace,
    load_traces,
    pooled_logits,
    sentence_risks,
)
from probes.metrics import BASELINE_SIGNS, auroc, auroc_ci95, nan_to_none, paired_auroc_difference
from probes.scope import fit_raw_logistic

FIT = ["tqa_short_train", "tqa_long_train", "madeup_train_short", "madeup_train_long"]
VAL = ["tqa_short_val", "tqa_long_val", "madeup_val_short", "madeup_val_long"]
TEST = ["tqa_short_test", "tqa_long_test", "nq_short"]
HELDOUT = ["heldout_short", "heldout_long", "heldout_real_long"]
SCOPE = ["scope_short", "scope_long", "known_long"]
POOLED_COLUMNS = ("pool_mean", "pool_max", "pool_window", *STAT_NAMES)
POOLED_NO_LENGTH = tuple(c for c in POOLED_COLUMNS if c != "length")
FALSE_ALARM_VAL = 0.08
ABSTAIN_RULE_VAL = 0.04
PRE_GENERATION_RULE_VAL = 0.02
POOLS = ("max", "topk", "window")


@dataclass
class AnswerSet:
    """One set's answers with aligned per-answer arrays (``[n]``; ``hidden`` ``[n, h]``)."""

    name: str
    records: list[AnswerRecord]
    y: np.ndarray
    correct: np.ndarray
    refusal: np.ndarray
    first_y: np.ndarray  # label of the first sentence alone (long-form sensitivity check)
    hidden: np.ndarray
    f: dict[str, np.ndarray] = field(default_factory=dict)  # features and design risks

    @property
    def n(self) -> int:
        return int(self.y.size)


def _features(scorer: RiskScorer, tokenizer: Any, record: AnswerRecord, trace: AnswerTrace) -> dict:
    stats = trace.stats()
    chars, ranges = answer_sentences(tokenizer, record.response_ids)
    risks = sentence_risks(scorer, trace, ranges)
    zs = [scorer.stack(trace.stats(a, b)) for a, b in ranges]
    top = int(np.argmax(risks))
    first = record.response[chars[0][0] : chars[0][1]] if chars else record.response
    out = {
        "risk_mean": scorer.answer_risk(stats),
        "z_mean": scorer.stack(stats),
        "risk_sentence_max": float(risks[top]),
        "z_sentence_max": float(zs[top]),
        "sentences": len(ranges),
        "first_correct": judge(first, record.answers, record.question).correct,
    }
    out.update({f"pool_{k}": v for k, v in pooled_logits(trace.token_logits).items()})
    out.update({name: stats.stat(name) for name in STAT_NAMES})
    return out


def load_set(work: Path, name: str, scorer: RiskScorer, tokenizer: Any) -> AnswerSet | None:
    """A set's answers with their features (cached in ``<set>.features.npz``, rebuilt when
    the answers or traces are newer)."""
    answers, traces_path = work / f"{name}.answers.jsonl", work / f"{name}.traces.npz"
    if not answers.exists() or not traces_path.exists():
        return None
    traces = load_traces(traces_path)
    records = [  # labels always follow the current judge
        rejudge(tokenizer, r) for r in read_answers(answers).values() if r.id in traces
    ]
    cache = work / f"{name}.features.npz"
    newest = max(answers.stat().st_mtime, traces_path.stat().st_mtime)
    f: dict[str, np.ndarray] = {}
    if cache.exists() and cache.stat().st_mtime > newest:
        with np.load(cache, allow_pickle=False) as data:
            if list(data["ids"]) == [r.id for r in records]:
                f = {key: data[key] for key in data.files if key != "ids"}
    if not f:
        rows = [_features(scorer, tokenizer, r, traces[r.id]) for r in records]
        f = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0]}
        np.savez(cache, ids=np.array([r.id for r in records], dtype=np.str_), **f)
    return AnswerSet(
        name=name,
        records=records,
        y=np.array([r.hallucinated for r in records], dtype=np.int64),
        correct=np.array([r.correct for r in records], dtype=bool),
        refusal=np.array([r.refusal for r in records], dtype=bool),
        first_y=np.array(
            [not fc and not r.refusal for fc, r in zip(f["first_correct"], records, strict=True)],
            dtype=np.int64,
        ),
        hidden=np.stack([traces[r.id].prompt_hidden for r in records]),
        f=f,
    )


def load_tokenizer(spec: str) -> Any:
    """The model's tokenizer alone (the analysis runs no forward pass)."""
    from transformers import AutoTokenizer

    from guard.model import prepare_tokenizer, resolve_spec

    location, gguf_file, _ = resolve_spec(spec)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    prepare_tokenizer(tokenizer)
    return tokenizer


def _stats(s: AnswerSet) -> np.ndarray:
    return np.stack([s.f[name] for name in STAT_NAMES], axis=1)


def _columns(sets: list[AnswerSet], columns: tuple[str, ...]) -> np.ndarray:
    return np.stack([_cat(sets, c) for c in columns], axis=1)


def _cat(sets: list[AnswerSet], key: str) -> np.ndarray:
    return np.concatenate([s.f[key] for s in sets])


def _labels(sets: list[AnswerSet]) -> np.ndarray:
    return np.concatenate([s.y for s in sets])


def knowledge_training(
    work: Path, fit: list[AnswerSet]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Rows of the knowledge probe: every fit answer's prompt, the short questions as typed
    (their short answer's label) and requests about correctly named real entities (0)."""
    x, y, groups, sources = [], [], [], []
    for s in fit:
        x.append(s.hidden)
        y.append(s.y)
        groups += [r.id.split("-long")[0].split("-short")[0] for r in s.records]
        sources += [s.name] * s.n
    short = next(s for s in fit if s.name == "tqa_short_train")
    label_of = {r.id: int(r.hallucinated) for r in short.records}
    with np.load(work / "prompt_states.npz", allow_pickle=False) as data:
        ids, hidden = [str(i) for i in data["ids"]], data["hidden"]
    keep = [i for i, rid in enumerate(ids) if "|known" in rid or rid.split("|")[0] in label_of]
    for i in keep:
        qid, kind = ids[i].split("|")
        y.append(np.array([0 if kind.startswith("known") else label_of[qid]]))
        groups.append(qid)
        sources.append("known_entity_requests" if kind.startswith("known") else "tqa_typed")
    x.append(hidden[keep])
    _, group_codes = np.unique(np.array(groups), return_inverse=True)
    return np.concatenate(x), np.concatenate(y), group_codes, sources


def _platt(z_val: np.ndarray, y_val: np.ndarray) -> Any:
    return fit_calibrator(z_val, y_val, "platt")


def fit_designs(work: Path, fit: list[AnswerSet], val: list[AnswerSet]) -> dict[str, Any]:
    """Fit every design (on ``fit``), calibrate on ``val``; returns the fitted parts."""
    y_fit, y_val = _labels(fit), _labels(val)
    stats_fit = np.concatenate([_stats(s) for s in fit])
    parts: dict[str, Any] = {"stackers": {}, "calibrators": {}}
    for pool in POOLS:
        stacker = fit_stacker(_cat(fit, f"pool_{pool}"), stats_fit, y_fit)
        parts["stackers"][pool] = stacker
    x, y, groups, sources = knowledge_training(work, fit)
    knowledge = fit_knowledge_probe(x, y, groups)
    parts["knowledge"] = knowledge
    parts["knowledge_rows"] = {src: sources.count(src) for src in sorted(set(sources))}
    # out-of-fold knowledge logits of the fit answers feed the stacker (no leak)
    oof = knowledge.oof_logits[: sum(s.n for s in fit)]
    combo_x = np.stack([_cat(fit, "z_sentence_max"), _cat(fit, "z_mean"), oof], axis=1)
    parts["combo"] = fit_raw_logistic(combo_x, y_fit, 1.0, 0)
    for name, columns in (("pooled", POOLED_COLUMNS), ("pooled_nolen", POOLED_NO_LENGTH)):
        parts[name] = fit_raw_logistic(_columns(fit, columns), y_fit, 1.0, 0)
    for s in val:
        add_design_scores(s, parts)
    for name in ("restack_" + p for p in POOLS):
        parts["calibrators"][name] = _platt(_cat(val, "z_" + name), y_val)
    for name in ("prompt", "combo", "sentence_max_recal", "pooled", "pooled_nolen"):
        parts["calibrators"][name] = _platt(_cat(val, "z_" + name), y_val)
    return parts


def add_design_scores(s: AnswerSet, parts: dict[str, Any]) -> None:
    """Every design's z (and, once calibrated, risk) for the answers of ``s``."""
    stats = _stats(s)
    for pool in POOLS:
        s.f[f"z_restack_{pool}"] = apply_stacker(
            parts["stackers"][pool], s.f[f"pool_{pool}"], stats
        )
    knowledge: KnowledgeFit = parts["knowledge"]
    s.f["z_prompt"] = knowledge.logits(s.hidden)
    weights, bias = parts["combo"]
    combo_x = np.stack([s.f["z_sentence_max"], s.f["z_mean"], s.f["z_prompt"]], axis=1)
    s.f["z_combo"] = combo_x @ weights + bias
    for name, columns in (("pooled", POOLED_COLUMNS), ("pooled_nolen", POOLED_NO_LENGTH)):
        weights, bias = parts[name]
        s.f[f"z_{name}"] = _columns([s], columns) @ weights + bias
    s.f["z_sentence_max_recal"] = s.f["z_sentence_max"]
    for name, calibrator in parts["calibrators"].items():
        s.f["risk_" + name] = np.clip(calibrator(s.f["z_" + name]), 0.0, 1.0)
    if "risk_prompt" in s.f:
        s.f["risk_max_sentence_prompt"] = np.maximum(s.f["risk_sentence_max"], s.f["risk_prompt"])


DESIGNS = {
    "mean (served today)": "risk_mean",
    "max pooling, restacked": "risk_restack_max",
    "top-4 pooling, restacked": "risk_restack_topk",
    "window-8 pooling, restacked": "risk_restack_window",
    "riskiest sentence": "risk_sentence_max",
    "riskiest sentence, recalibrated": "risk_sentence_max_recal",
    "prompt knowledge probe": "risk_prompt",
    "max(riskiest sentence, prompt)": "risk_max_sentence_prompt",
    "stack(sentence, mean, prompt)": "risk_combo",
    "stack(mean, max, window-8 pooling, stats)": "risk_pooled",
    "stack(mean, max, window-8 pooling, stats but length)": "risk_pooled_nolen",
}


def threshold_for(correct_risks: list[np.ndarray], rate: float = FALSE_ALARM_VAL) -> float:
    """The lowest line flagging at most ``rate`` of each group's correct answers."""
    line = 0.0
    for risks in correct_risks:
        ordered = np.sort(np.asarray(risks))[::-1]
        allowed = int(np.floor(rate * ordered.size))
        if allowed < ordered.size:
            line = max(line, float(np.nextafter(ordered[allowed], np.inf)))
    return line


def flagged(s: AnswerSet, key: str, line: float, in_scope: np.ndarray | None) -> np.ndarray:
    hit = s.f[key] >= line
    return hit if in_scope is None else hit & in_scope


def summary_rates(
    s: AnswerSet, key: str, line: float, scopes: dict[str, np.ndarray | None]
) -> dict[str, Any]:
    """Flagged-or-abstained shares of a set's answers, per scope gate variant."""
    out: dict[str, Any] = {"n": s.n, "refusals": int(s.refusal.sum())}
    for gate, in_scope in scopes.items():
        hit = flagged(s, key, line, in_scope)
        out[gate] = {
            "in_scope": 1.0 if in_scope is None else float(in_scope.mean()),
            "flagged": float(hit.mean()),
            "flagged_or_refused": float((hit | s.refusal).mean()),
            "correct_flagged": float(hit[s.correct].mean()) if s.correct.any() else None,
            "correct_n": int(s.correct.sum()),
        }
    return out


def auroc_entry(y: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    return {"auroc": auroc(y, score), "auroc_ci95": auroc_ci95(y, score)}


def long_form_report(s: AnswerSet) -> dict[str, Any]:
    """AUROC of each design and baseline on long-form answers, best design vs best baseline."""
    out: dict[str, Any] = {"n": s.n, "hallucinated": int(s.y.sum())}
    out["designs"] = {d: auroc_entry(s.y, s.f[k]) for d, k in DESIGNS.items()}
    base = {name: auroc_entry(s.y, sign * s.f[name]) for name, sign in BASELINE_SIGNS.items()}
    out["baselines"] = base
    best = max(base, key=lambda name: base[name]["auroc"])
    out["best_baseline"] = best
    out["minus_best_baseline"] = {
        d: paired_auroc_difference(s.y, s.f[k], BASELINE_SIGNS[best] * s.f[best])
        for d, k in DESIGNS.items()
    }
    out["first_sentence_label"] = {
        "hallucinated": int(s.first_y.sum()),
        "designs": {d: auroc(s.first_y, s.f[k]) for d, k in DESIGNS.items()},
    }
    return out


def analyse(work: Path, heldout: bool = False) -> dict[str, Any]:
    """Every figure of the long-form benchmark (see the module docstring)."""
    probe = load_probe("default")
    scorer = RiskScorer(probe)
    tokenizer = load_tokenizer(str(probe.manifest.training.get("model_spec", "smollm2")))
    gate = None
    if probe.scope is not None and probe.manifest.scope is not None:
        gate = ScopeGate(probe.scope.weights, probe.scope.bias, probe.manifest.scope.threshold)
    names = FIT + VAL + TEST + SCOPE + (HELDOUT if heldout else [])
    sets = {n: s for n in names if (s := load_set(work, n, scorer, tokenizer)) is not None}
    fit, val = [sets[n] for n in FIT], [sets[n] for n in VAL]
    parts = fit_designs(work, fit, val)
    for s in sets.values():
        add_design_scores(s, parts)
    return build_report(sets, parts, gate, work)


def _scopes(s: AnswerSet, gate: ScopeGate | None, work: Path) -> dict[str, np.ndarray | None]:
    import torch

    scopes: dict[str, np.ndarray | None] = {"no_gate": None}
    if gate is not None:
        p = gate.probabilities(torch.as_tensor(s.hidden, dtype=torch.float32)).numpy()
        scopes["shipped_gate"] = p >= gate.threshold
    retrained = work / "scope_retrained.npz"
    if retrained.exists():
        with np.load(retrained, allow_pickle=False) as data:
            z = s.hidden @ data["weights"] + float(data["bias"])
            scopes["retrained_gate"] = 1 / (1 + np.exp(-z)) >= float(data["threshold"])
    return scopes


def build_report(
    sets: dict[str, AnswerSet], parts: dict[str, Any], gate: ScopeGate | None, work: Path
) -> dict[str, Any]:
    def line(key: str, rate: float) -> float:
        return threshold_for([sets[n].f[key][sets[n].correct] for n in VAL[:2]], rate)

    lines = {design: line(key, FALSE_ALARM_VAL) for design, key in DESIGNS.items()}
    report: dict[str, Any] = {
        "sets": {
            n: {
                "n": s.n,
                "hallucinated": int(s.y.sum()),
                "correct": int(s.correct.sum()),
                "refusals": int(s.refusal.sum()),
            }
            for n, s in sets.items()
        },  # fmt: skip
        "false_alarm_rule_val": FALSE_ALARM_VAL,
        "thresholds": lines,
        "knowledge_probe": {
            "C": parts["knowledge"].c,
            "search": parts["knowledge"].search,
            "rows": parts["knowledge_rows"],
        },  # fmt: skip
        "designs": {},
    }
    for design, key in DESIGNS.items():
        entry: dict[str, Any] = {"threshold": lines[design]}
        for name, s in sets.items():
            entry[name] = summary_rates(s, key, lines[design], _scopes(s, gate, work))
        for name in ("tqa_short_val", "tqa_long_val", "tqa_short_test", "nq_short"):
            if name in sets:
                entry[name]["auroc"] = auroc_entry(sets[name].y, sets[name].f[key])
        report["designs"][design] = entry
    report["selection"] = select_design(report["designs"])
    report["fitted"] = fitted_parts(parts)
    if "tqa_long_test" in sets:
        report["long_form_test"] = long_form_report(sets["tqa_long_test"])
    # the abstain line and pre-generation abstention on the prompt risk alone
    report["abstain_rule_val"] = ABSTAIN_RULE_VAL
    report["abstain_thresholds"] = {d: line(k, ABSTAIN_RULE_VAL) for d, k in DESIGNS.items()}
    pre = line("risk_prompt", PRE_GENERATION_RULE_VAL)
    report["pre_generation"] = {
        "rule_val": PRE_GENERATION_RULE_VAL,
        "threshold": pre,
        "abstained": {
            n: summary_rates(s, "risk_prompt", pre, _scopes(s, gate, work)) for n, s in sets.items()
        },  # fmt: skip
    }
    report["today"] = {
        name: summary_rates(s, "risk_mean", probe_flag(), _scopes(s, gate, work))
        for name, s in sets.items()
    }
    report = dict(nan_to_none(report))
    gate = "retrained_gate" if (work / "scope_retrained.npz").exists() else "shipped_gate"
    report["table_gate"] = gate
    report["table"] = markdown_table(report, gate)
    return report


def probe_flag() -> float:
    return float(load_probe("default").manifest.thresholds.flag)


def fitted_parts(parts: dict[str, Any]) -> dict[str, Any]:
    """The fitted numbers a runtime needs, in raw feature units (z = b + sum w_i x_i, then
    risk = sigmoid(a z + c) with the Platt calibrator fitted on validation)."""
    out: dict[str, Any] = {}
    for name, columns in (("pooled", POOLED_COLUMNS), ("pooled_nolen", POOLED_NO_LENGTH)):
        weights, bias = parts[name]
        out[name] = {"intercept": bias, "coef": dict(zip(columns, weights.tolist(), strict=True))}
    for name, stacker in parts["stackers"].items():
        out[f"restack_{name}"] = stacker.model_dump()
    weights, bias = parts["combo"]
    out["combo"] = {"intercept": bias, "coef": dict(zip(
        ("z_sentence_max", "z_mean", "z_prompt"), weights.tolist(), strict=True))}  # fmt: skip
    out["calibrators"] = {n: c.model_dump() for n, c in parts["calibrators"].items()}
    knowledge = parts["knowledge"]
    out["knowledge_probe"] = {"bias": knowledge.bias, "weights_norm": float(np.linalg.norm(
        knowledge.weights)), "C": knowledge.c}  # fmt: skip
    return out
