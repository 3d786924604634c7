"""The answer sets of the long-form measurement, as `QAItem` lists with how to ask them.

Each set is a list of questions and the `PromptRecipe` they are put to the model with:
- TriviaQA short (the shipped probe's recipe) and long form (`LONG_RECIPE`: "Answer in two
  or three sentences.", 96 new tokens), train / validation / test splits;
- NQ-open short (out of domain, the quality benchmark's second set);
- made-up entities from `probes.madeup` (fit: seed 0, threshold choice: seed 1), asked as
  users type them (no instruction): short questions with 48 new tokens, long-form
  requests with 96. Their only alias is the entity's name, which the judge ignores
  because the question holds it, so every answer is "not correct" and the label is
  hallucinated unless the answer is a refusal;
- the independent held-out made-up set (`bench/data/madeup_heldout.jsonl`), asked the
  same way (its ``real_long`` rows ask about real entities: no labels, flag rate only).

    sets = standard_sets(vocabulary)
    items, recipe = sets["madeup_train_long"]
"""

from __future__ import annotations

import json
from pathlib import Path

from guard.probe import PromptRecipe
from probes.datasets import QAItem, load_questions, split_of
from probes.longform import LONG_NEW_TOKENS, LONG_RECIPE
from probes.madeup import MadeUpPrompt, Vocabulary, made_up_entities, render

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRIVIAQA = DATA / "triviaqa" / "triviaqa.jsonl"
NQ_OPEN = DATA / "nq_open" / "nq_open_dev.jsonl"
SHORT_RECIPE = PromptRecipe()  # the shipped probe's: "Answer in a few words.", 20 tokens
PLAIN_SHORT = PromptRecipe(instruction="", max_new_tokens=48)
PLAIN_LONG = PromptRecipe(instruction="", max_new_tokens=LONG_NEW_TOKENS)

SIZES = {
    "train": 600,
    "train_long": 250,
    "val": 1035,
    "val_long": 250,
    "test": 1050,
    "test_long": 600,
}
MADEUP = {"train": (0, 200), "val": (1, 100)}  # (seed, entities)
NQ_QUESTIONS = 1200

AnswerSet = tuple[list[QAItem], PromptRecipe]


def real_entity(answers: list[str]) -> str | None:
    """A gold answer that names an entity ("Charles Dickens"), not a number or a word."""
    name = answers[0].strip()
    if not name[:1].isupper() or any(ch.isdigit() for ch in name) or len(name) < 4:
        return None
    return name


def madeup_items(prompts: list[MadeUpPrompt]) -> list[QAItem]:
    return [QAItem(id=p.id, question=p.prompt, answers=[p.entity.name]) for p in prompts]


def triviaqa_sets() -> dict[str, AnswerSet]:
    items = load_questions(TRIVIAQA)
    by = {s: [i for i in items if split_of(i.id) == s] for s in ("train", "val", "test")}
    return {
        "tqa_short_train": (by["train"][: SIZES["train"]], SHORT_RECIPE),
        "tqa_short_val": (by["val"][: SIZES["val"]], SHORT_RECIPE),
        "tqa_short_test": (by["test"][: SIZES["test"]], SHORT_RECIPE),
        "tqa_long_train": (by["train"][: SIZES["train_long"]], LONG_RECIPE),
        "tqa_long_val": (by["val"][: SIZES["val_long"]], LONG_RECIPE),
        "tqa_long_test": (by["test"][: SIZES["test_long"]], LONG_RECIPE),
    }


def madeup_sets(vocabulary: Vocabulary) -> dict[str, AnswerSet]:
    out: dict[str, AnswerSet] = {}
    taken: set[str] = set()
    for split, (seed, n) in MADEUP.items():
        entities = [e for e in made_up_entities(n, seed, vocabulary) if e.name.lower() not in taken]
        taken |= {e.name.lower() for e in entities}
        prompts = render(entities, seed=seed)
        for form, recipe in (("short", PLAIN_SHORT), ("long", PLAIN_LONG)):
            chosen = [p for p in prompts if p.form == form]
            out[f"madeup_{split}_{form}"] = (madeup_items(chosen), recipe)
    return out


def standard_sets(vocabulary: Vocabulary) -> dict[str, AnswerSet]:
    """Every set but the held-out one, in the order they are collected."""
    tqa = triviaqa_sets()
    made = madeup_sets(vocabulary)
    order = [
        "tqa_short_train", "tqa_short_test", "tqa_short_val",
        "madeup_train_short", "madeup_train_long", "madeup_val_short", "madeup_val_long",
        "tqa_long_train", "tqa_long_val", "tqa_long_test",
    ]  # fmt: skip
    sets = {**tqa, **made}
    out = {name: sets[name] for name in order}
    out["nq_short"] = (load_questions(NQ_OPEN, limit=NQ_QUESTIONS), SHORT_RECIPE)
    return out


def scope_sets(path: Path) -> dict[str, AnswerSet]:
    """`bench/scope.py`'s held-out prompts (not factual questions) as that bench sends them:
    64 new tokens, 200 for the long-answer ones. No labels: flag rates only."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    out: dict[str, AnswerSet] = {}
    for name, long, tokens in (("scope_short", False, 64), ("scope_long", True, 200)):
        items = [
            QAItem(id=str(r["id"]), question=str(r["prompt"]), answers=["-"])
            for r in rows
            if bool(r["long"]) == long
        ]
        out[name] = (items, PromptRecipe(instruction="", max_new_tokens=tokens))
    return out


def heldout_sets(path: Path) -> dict[str, AnswerSet]:
    """A held-out set by kind (``short``, ``long``, ``real_long``, and ``real_short`` where the
    file has it: short questions about real entities, flag rate only)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    out: dict[str, AnswerSet] = {}
    kinds = (("short", PLAIN_SHORT), ("long", PLAIN_LONG), ("real_long", PLAIN_LONG),
             ("real_short", PLAIN_SHORT))  # fmt: skip
    for kind, recipe in kinds:
        items = [
            QAItem(id=str(r["id"]), question=str(r["prompt"]), answers=[str(r["entity"])])
            for r in rows
            if r["kind"] == kind
        ]
        if items:
            out[f"heldout_{kind}"] = (items, recipe)
    return out
