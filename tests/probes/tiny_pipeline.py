"""A tiny end-to-end set-up: a saved random Llama and a QA file it answers half right.

The random model (BPE tokenizer, LM head as initialised) answers greedily once; the gold alias of
every other question is then set to the first word the model answered, so the judge finds
both classes in every split without a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from guard.model import load_model
from guard.probe import PromptRecipe
from probes.build import BuildConfig
from probes.collect import collect_answers
from probes.datasets import QAItem, split_of
from probes.judge import normalize_answer
from probes.train import TrainConfig
from tests.fixtures.models import save_tiny_model

RECIPE = PromptRecipe(max_new_tokens=6)
WORDS = ["Paris", "France", "Hamlet", "tower", "capital", "Belsen", "city", "wrote"]


def write_questions(model_dir: Path, path: Path, n: int = 90) -> Path:
    """A JSONL QA file whose aliases make about half of the tiny model's answers correct."""
    loaded = load_model(str(model_dir))
    items = [
        QAItem(id=f"tiny_{i}", question=f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]} {i}?", answers=["x"])
        for i in range(n)
    ]
    scratch = path.with_suffix(".scratch.jsonl")
    records = collect_answers(loaded, items, scratch, RECIPE, batch_size=32)
    seen: dict[str, int] = {}
    with path.open("w", encoding="utf-8") as sink:
        for item, record in zip(items, records, strict=True):
            words = normalize_answer(record.response).split()
            split = split_of(item.id)
            seen[split] = seen.get(split, 0) + 1
            right = bool(words) and seen[split] % 2 == 0
            answers = [words[0]] if right else ["qqqzzz"]
            sink.write(json.dumps({"id": item.id, "question": item.question, "answers": answers}))
            sink.write("\n")
    return path


def tiny_build_config(root: Path) -> BuildConfig:
    """Under ``root``: the saved model, its QA file and where the probe goes."""
    model_dir = save_tiny_model(root / "model", seed=3, tokenizer="bpe", sharpen=False)
    dataset = write_questions(model_dir, root / "qa.jsonl")
    return BuildConfig(
        dataset=dataset,
        out=root / "probe",
        model=str(model_dir),
        batch_size=16,
        prompt=RECIPE,
        train=TrainConfig(c_grid=[0.5, 5.0], cv_folds=2, screen_top_k=None),
    )
