"""Retrain the scope gate with long-form requests about named entities as in-scope examples.

    python bench/longform_scope.py --work work-longform

Issue 11: "Tell me about <entity>", "Write a short biography of ...", "What is the history of
<entity>?" ask for facts and must be judged, while chit-chat, creative writing, code and
instructions stay out. The shipped gate (`probes.scope`) saw only short questions as in
scope. This refit keeps its recipe (train questions in three phrasings against the 420 open
prompts, C by grouped CV, threshold keeping 99% of 600 validation questions; 800 train
questions instead of 1,500, for CPU time) and adds as in-scope: 200 TriviaQA train
questions in the long-form recipe, the generator's 200 seed-0 long-form requests about
made-up entities, and 200 long-form requests about real entities (TriviaQA train gold
answers that are names). Writes
``<work>/scope_retrained.npz`` (weights, bias, threshold) and ``scope_retrained.json``
(the recipe with its out-of-fold evaluation, and the in-scope share of TriviaQA test and
NQ-open questions as users type them, under both gates). The held-out checks (bench/scope.py's
prompts, the made-up held-out set) are measured by `bench/longform_analysis.py`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PER_SOURCE = 200
QUESTIONS = 800  # train questions (the shipped gate: 1,500), for the shared CPU budget
FACTUAL = 600  # questions per factual set for the in-scope share


def long_form_positives(vocabulary: Any) -> list[list[dict[str, str]]]:
    """The extra in-scope conversations (train data only, see the module docstring)."""
    from probes.datasets import load_questions, split_of
    from probes.longform import LONG_RECIPE
    from probes.longform_data import TRIVIAQA, madeup_sets, real_entity
    from probes.madeup_templates import generic_long_requests

    train = [i for i in load_questions(TRIVIAQA) if split_of(i.id) == "train"]
    rng = random.Random(11)
    out = [LONG_RECIPE.messages(i.question) for i in train[-EXTRA_PER_SOURCE:]]
    made, _ = madeup_sets(vocabulary)["madeup_train_long"]
    out += [[{"role": "user", "content": item.question}] for item in made[:EXTRA_PER_SOURCE]]
    names = [n for n in (real_entity(i.answers) for i in train) if n is not None]
    for name in names[:EXTRA_PER_SOURCE]:
        out.append([{"role": "user", "content": rng.choice(generic_long_requests(name))}])
    return out


def factual_in_scope(loaded: Any, gates: dict[str, tuple[np.ndarray, float, float]]) -> dict:
    """Share of TriviaQA test / NQ-open questions, as users type them, each gate keeps."""
    from probes.datasets import load_questions, split_of
    from probes.longform_data import NQ_OPEN, TRIVIAQA
    from probes.scope import hidden_states

    out: dict[str, Any] = {}
    for name, path in (("triviaqa_test", TRIVIAQA), ("nq_open_dev", NQ_OPEN)):
        items = load_questions(path)
        if name == "triviaqa_test":
            items = [i for i in items if split_of(i.id) == "test"]
        items = items[:FACTUAL]
        hidden = hidden_states(
            loaded, [[{"role": "user", "content": i.question}] for i in items], 32
        )
        out[name] = {"n": len(items)}
        for gate, (weights, bias, threshold) in gates.items():
            p = 1 / (1 + np.exp(-(hidden.astype(np.float64) @ weights + bias)))
            out[name][gate] = float(np.mean(p >= threshold))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work-longform")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from guard.model import load_model
    from guard.probe import PromptRecipe, load_probe
    from probes.datasets import load_questions, split_of
    from probes.longform_data import NQ_OPEN, TRIVIAQA
    from probes.madeup import Vocabulary
    from probes.scope import ScopeConfig, fit_scope_gate

    probe = load_probe("default")
    loaded = load_model(str(probe.manifest.training.get("model_spec", "smollm2")))
    items = load_questions(TRIVIAQA)
    train = [i.question for i in items if split_of(i.id) == "train"]
    val = [i.question for i in items if split_of(i.id) == "val"]
    extra = long_form_positives(Vocabulary.from_qa_files([TRIVIAQA, NQ_OPEN]))
    recipe, weights = fit_scope_gate(
        loaded,
        train,
        val,
        ScopeConfig(max_questions=QUESTIONS),
        PromptRecipe(),
        extra_in_scope=extra,
    )
    np.savez(
        args.work / "scope_retrained.npz",
        weights=weights.weights,
        bias=np.float64(weights.bias),
        threshold=np.float64(recipe.threshold),
    )
    shipped = probe.scope
    if shipped is None or probe.manifest.scope is None:
        raise RuntimeError("the shipped probe has no scope gate")
    gates = {
        "shipped_gate": (shipped.weights, shipped.bias, probe.manifest.scope.threshold),
        "retrained_gate": (weights.weights, weights.bias, recipe.threshold),
    }
    report = {
        "recipe": recipe.model_dump(),
        "shipped_recipe_evaluation": probe.manifest.scope.evaluation,
        "factual_questions_in_scope": factual_in_scope(loaded, gates),
    }
    (args.work / "scope_retrained.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["factual_questions_in_scope"]), recipe.evaluation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
