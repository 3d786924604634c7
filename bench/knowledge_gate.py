"""Fit the knowledge gate (issue 11), score every collected prompt, optionally ship it.

    python bench/longform.py --stage collect            # the answers this reads, first
    python bench/knowledge_gate.py --work work-longform [--also DIR ...] \\
        [--attach guard/default_probe --scope-gate work-longform/scope_retrained.npz]
    python bench/knowledge_gate.py --work work-v3 --reworded --out .../knowledge_gate_v3.json

The design was chosen on validation data only and frozen before the second held-out set
was read (`bench/results/knowledge_frozen.json`): the residual stream after decoder layer
15 (0-based; ``hidden_states[16]``) at the last prompt token, C = 0.1. The shipped version
adds real examples (`knowledge_frozen_v2.json`, frozen before the third held-out set).

- Fit (label 1 = a made-up entity): the generator's seed-0 entities, short and long
  (`probes.longform_data`); label 0: TriviaQA train questions in the shipped recipe and
  the long-form recipe (the collected ones), 3,000 as users type them (plain, casual), the
  420 open prompts of `probes/data/open_prompts.jsonl` (two phrasings), requests about the
  train entities the model named correctly, and requests about 1,200 train gold-answer
  names in the generator's own long-form templates (two each).
- Lines, on validation prompts: flag at most 8% of the model's correct validation answers
  (short, long, typed each) and 10% of requests about 300 validation gold-answer names;
  abstain at most 4% / 5%.
- Scores: ``<set>.prompt_risk.json`` (``{id: prompt_risk}``) beside every
  ``<set>.answers.jsonl`` of ``--work`` and ``--also`` (for `bench/longform_analysis.py`).
- ``--attach``: rewrites that probe directory with the gate (and ``--scope-gate``'s
  retrained scope gate) and prints the manifest sha256 to pin in `guard.shipped`.

- ``--reworded`` (v3, `knowledge_frozen_v3.json`; not shipped: `knowledge_v3_decision.json`):
  the made-up and the real prompts also in the other wordings of `probes.knowledge.render`
  (instructions appended, a system message), fitted and checked alike.

Writes the gate's recipe and evaluation to ``--out`` (default
``bench/results/knowledge_gate.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYER, C = 15, 0.1  # frozen: bench/results/knowledge_frozen.json
REAL_TRAIN_NAMES, REAL_VAL_NAMES = 1200, 300
TYPED_TRAIN = 3000  # TriviaQA train questions as users type them (real, label 0)
FIT_SETS = ("madeup_train_short", "madeup_train_long", "tqa_short_train", "tqa_long_train")
# v3: the made-up and the real prompts also in these wordings (`probes.knowledge.render`);
# every REWORD_EVERY-th real training prompt per wording (TriviaQA questions come with
# the instructions already: only the system message is added to the typed ones)
REWORDED = ("short_instruction", "long_instruction", "system")
REWORD_EVERY = 4
log = logging.getLogger("knowledge_gate")


def _answers(work: Path, name: str) -> dict[str, Any]:
    from probes.collect import read_answers

    path = work / f"{name}.answers.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python bench/longform.py --stage collect`")
    return read_answers(path)


def _names(split: str, n: int) -> list[tuple[str, str]]:
    """The first ``n`` distinct gold-answer names of a TriviaQA split: (question id, name)."""
    from probes.datasets import load_questions, split_of
    from probes.longform_data import TRIVIAQA, real_entity

    out, seen = [], set()
    for item in load_questions(TRIVIAQA):
        name = real_entity(item.answers) if split_of(item.id) == split else None
        if name is not None and name.lower() not in seen:
            seen.add(name.lower())
            out.append((item.id, name))
    return out[:n]


def build_prompts(
    work: Path, tokenizer: Any, *, reworded: bool = False
) -> dict[str, tuple[list[list[int]], np.ndarray]]:
    """Every fit and validation group: token-id prompts and, per prompt, 1 = made up;
    ``reworded`` (v3): also in the `REWORDED` wordings."""
    from guard.model import encode_chats
    from guard.probe import PromptRecipe
    from probes.datasets import load_questions, split_of
    from probes.knowledge import render
    from probes.longform_data import TRIVIAQA, real_entity
    from probes.madeup_templates import generic_long_requests
    from probes.scope import OPEN_PROMPTS, load_open_prompts, open_variants, question_variants

    def encoded(conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        return encode_chats(tokenizer, conversations, None)[0] if conversations else []

    def asked(prompts: list[str], style: str, label: int) -> tuple[list[list[int]], Any]:
        return encoded([render(p, style) for p in prompts]), np.full(len(prompts), label)

    groups: dict[str, tuple[list[list[int]], np.ndarray]] = {}
    for name in (*FIT_SETS, "madeup_val_short", "madeup_val_long"):
        records = list(_answers(work, name).values())
        label = 1 if name.startswith("madeup") else 0
        groups[name] = ([list(r.prompt_ids) for r in records], np.full(len(records), label))
    train_questions = [i.question for i in load_questions(TRIVIAQA) if split_of(i.id) == "train"]
    val_correct = [r.question for r in _answers(work, "tqa_short_val").values() if r.correct]
    for split, questions in (("train", train_questions[:TYPED_TRAIN]), ("val", val_correct)):
        typed = [c for q in questions for c in question_variants(q, PromptRecipe())[:2]]
        groups[f"typed_{split}"] = (encoded(typed), np.zeros(len(typed)))
    opens = [c for p in load_open_prompts(OPEN_PROMPTS) for c in open_variants(p.prompt)]
    groups["open_train"] = (encoded(opens), np.zeros(len(opens)))
    for split in ("short", "long"):
        answered = _answers(work, f"tqa_{split}_val").values()
        prompts = [list(r.prompt_ids) for r in answered if r.correct]
        groups[f"correct_{split}_val"] = (prompts, np.zeros(len(prompts)))
    known: list[list[dict[str, str]]] = []
    train = {**_answers(work, "tqa_long_train"), **_answers(work, "tqa_short_train")}
    for record in train.values():
        entity = real_entity(record.answers) if record.correct else None
        if entity is not None:
            known += [[{"role": "user", "content": q}] for q in generic_long_requests(entity)[::3]]
    groups["known_train"] = (encoded(known), np.zeros(len(known)))
    rng = random.Random(5)
    real: dict[str, list[str]] = {}
    for split, n, per in (("train", REAL_TRAIN_NAMES, 2), ("val", REAL_VAL_NAMES, 1)):
        real[split] = [
            q for _, name in _names(split, n) for q in rng.sample(generic_long_requests(name), per)
        ]
        groups[f"real_{split}"] = asked(real[split], "plain", 0)
    if not reworded:
        return groups
    # The same prompts in the other wordings (v3): made-up ones, real entity requests and
    # typed TriviaQA questions alike, so that no wording carries the label.
    made_up = {
        split: [r.question for form in ("short", "long")
                for r in _answers(work, f"madeup_{split}_{form}").values()]
        for split in ("train", "val")
    }  # fmt: skip
    for style in REWORDED:
        for split in ("train", "val"):
            groups[f"madeup_{split}_{style}"] = asked(made_up[split], style, 1)
        groups[f"real_train_{style}"] = asked(real["train"][::REWORD_EVERY], style, 0)
        groups[f"real_val_{style}"] = asked(real["val"], style, 0)
    typed_system = train_questions[:TYPED_TRAIN][::REWORD_EVERY]
    groups["typed_train_system"] = asked(typed_system, "system", 0)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work-longform")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="more answer dirs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/knowledge_gate.json")
    parser.add_argument("--attach", type=Path, help="a probe directory to rewrite with the gate")
    parser.add_argument("--scope-gate", type=Path, help="scope_retrained.npz to attach too")
    parser.add_argument("--scope-report", type=Path, help="its scope_retrained.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reworded", action="store_true",
        help="v3: fit and check in every wording (the shipped gate is v2: without it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from guard.model import load_model
    from probes.knowledge import fit_knowledge_gate

    torch.set_num_threads(args.threads)
    loaded = load_model()
    groups = build_prompts(args.work, loaded.tokenizer, reworded=args.reworded)
    states = cached_states(loaded, groups, args.work / f"knowledge_states_L{LAYER}.npz")
    wordings = REWORDED if args.reworded else ()
    fit = [*FIT_SETS, "typed_train", "open_train", "known_train", "real_train"]
    fit += [f"{kind}_train_{style}" for kind in ("madeup", "real") for style in wordings]
    fit += ["typed_train_system"] if args.reworded else []
    real_val = {"real_entity_requests_val": "real_val"}
    real_val.update({f"real_entity_requests_val_{s}": f"real_val_{s}" for s in wordings})
    recipe, weights = fit_knowledge_gate(
        np.concatenate([states[n] for n in fit]),
        np.concatenate([groups[n][1] for n in fit]),
        layer=LAYER,
        c=C,
        flag_checks={
            "correct_short_val": (states["correct_short_val"], 0.08),
            "correct_long_val": (states["correct_long_val"], 0.08),
            "correct_typed_val": (states["typed_val"], 0.08),
            **{check: (states[group], 0.10) for check, group in real_val.items()},
        },
        abstain_checks={
            "correct_short_val": (states["correct_short_val"], 0.04),
            "correct_long_val": (states["correct_long_val"], 0.04),
            "correct_typed_val": (states["typed_val"], 0.04),
            **{check: (states[group], 0.05) for check, group in real_val.items()},
        },
        training={
            "feature": f"residual stream after decoder layer {LAYER} at the last prompt token",
            "groups": {n: int(len(groups[n][1])) for n in fit},
            "wordings": "made-up and real prompts each as typed, with the short and the "
            "long-form instruction, and after a system message (probes.knowledge.render)"
            if args.reworded
            else "made-up prompts as typed (v2)",
            "frozen": f"bench/results/knowledge_frozen_v{3 if args.reworded else 2}.json",
        },
    )
    z = {n: states[n].astype(np.float64) @ weights.weights + weights.bias for n in states}
    flag_logit = float(np.log(recipe.flag / (1 - recipe.flag)))
    val_sets = ["madeup_val_short", "madeup_val_long", *(f"madeup_val_{s}" for s in wordings)]
    made_up_val = {n: float(np.mean(z[n] >= flag_logit)) for n in val_sets}
    report = {"recipe": recipe.model_dump(mode="json"), "made_up_val_flagged": made_up_val}
    log.info("gate: flag %.4f abstain %.4f, %s", recipe.flag, recipe.abstain, made_up_val)
    score_dirs(loaded, weights, [args.work, *args.also])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.attach is not None:
        sha = attach(args.attach, recipe, weights, args.scope_gate, args.scope_report)
        print(f"manifest sha256 {sha}: pin it in guard/shipped.py")
    return 0


def cached_states(loaded: Any, groups: dict[str, Any], cache: Path) -> dict[str, np.ndarray]:
    """Every group's gate input, kept in ``cache`` (a group is recomputed when its number
    of prompts changed)."""
    from probes.knowledge import residual_states

    kept: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            kept = {name: data[name] for name in data.files}
    states: dict[str, np.ndarray] = {}
    for name, (prompts, _) in groups.items():
        hit = kept.get(name)
        states[name] = (
            hit if hit is not None and len(hit) == len(prompts)
            else residual_states(loaded, prompts, LAYER)
        )  # fmt: skip
    np.savez(cache, **states)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
    return states


def score_dirs(loaded: Any, weights: Any, dirs: list[Path]) -> None:
    """``<set>.prompt_risk.json`` beside every answer set of ``dirs`` (the states are kept in
    ``<set>.residual_L<layer>.npy``)."""
    from probes.collect import read_answers
    from probes.knowledge import residual_states

    for work in dirs:
        for path in sorted(work.glob("*.answers.jsonl")):
            records = list(read_answers(path).values())
            if not records:
                continue
            cache = path.with_name(path.name.replace(".answers.jsonl", f".residual_L{LAYER}.npy"))
            x = np.load(cache) if cache.exists() else None
            if x is None or len(x) != len(records):
                x = residual_states(loaded, [list(r.prompt_ids) for r in records], LAYER)
                np.save(cache, x)
            risk = 1 / (1 + np.exp(-(x.astype(np.float64) @ weights.weights + weights.bias)))
            out = path.with_name(path.name.replace(".answers.jsonl", ".prompt_risk.json"))
            scores = {r.id: float(p) for r, p in zip(records, risk, strict=True)}
            out.write_text(json.dumps(scores) + "\n", encoding="utf-8")


def attach(
    directory: Path, recipe: Any, weights: Any, scope_npz: Path | None, scope_json: Path | None
) -> str:
    """Rewrite the probe at ``directory`` with the knowledge gate (and a retrained scope
    gate); every other file is kept byte for byte."""
    from guard.probe import (
        FORMAT_VERSION,
        KNOWLEDGE_FILE,
        SCOPE_FILE,
        WEIGHTS_FILE,
        GateWeights,
        ScopeRecipe,
        load_probe,
        save_probe,
    )

    probe = load_probe(directory)
    scope, scope_recipe = probe.scope, probe.manifest.scope
    if scope_npz is not None:
        with np.load(scope_npz, allow_pickle=False) as data:
            scope = GateWeights(data["weights"].astype(np.float64), float(data["bias"]))
        if scope_json is None:
            raise SystemExit("--scope-gate needs --scope-report (its recipe)")
        scope_recipe = ScopeRecipe.model_validate(json.loads(scope_json.read_text())["recipe"])
    keep = {
        name: (probe.path / name).read_bytes()
        for name in probe.manifest.files
        if name not in (WEIGHTS_FILE, SCOPE_FILE, KNOWLEDGE_FILE)
    }
    manifest = probe.manifest.model_copy(
        update={
            "files": {},
            "scope": scope_recipe,
            "knowledge": recipe,
            "format_version": FORMAT_VERSION,
        }  # fmt: skip
    )
    return save_probe(directory, manifest, probe.weights, keep, scope=scope, knowledge=weights)


if __name__ == "__main__":
    sys.exit(main())
