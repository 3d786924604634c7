"""Fitting the scope gate (`probes.scope`) on a tiny model: the recipe, the threshold rule,
and agreement between the offline fit and the runtime gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guard.probe import PromptRecipe
from guard.scope import ScopeGate
from probes.scope import (
    OPEN_PROMPTS,
    ScopeConfig,
    fit_scope_gate,
    hidden_states,
    load_open_prompts,
    question_variants,
)
from tests.fixtures.models import tiny_loaded

SUBJECTS = ["France", "Peru", "Kenya", "Japan", "Chile", "Norway", "Egypt", "Nepal", "Cuba"]


def _questions(count: int, offset: int = 0) -> list[str]:
    return [
        f"What is the capital of {SUBJECTS[i % len(SUBJECTS)]} number {i + offset}?"
        for i in range(count)
    ]


def _open_prompts(path: Path, count: int) -> Path:
    rows = [
        {"id": f"creative_{i}", "category": "creative" if i % 2 else "code",
         "prompt": f"Please write me a long poem or a python function, variant {i}, thanks!"}
        for i in range(count)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_open_prompts_are_valid_and_varied() -> None:
    rows = load_open_prompts(OPEN_PROMPTS)
    assert len(rows) >= 400
    assert len({row.prompt for row in rows}) == len(rows)
    assert {row.category for row in rows} >= {"chit_chat", "creative", "code", "instructions"}


def test_bad_open_prompt_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "category": "x", "prompt": "hi"}\n{"id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_open_prompts(path)


def test_question_variants_are_how_users_type() -> None:
    variants = question_variants("Who wrote Hamlet?", PromptRecipe())
    assert [v[-1]["content"] for v in variants] == [
        "Who wrote Hamlet?",
        "who wrote hamlet",
        "Who wrote Hamlet? Answer in a few words.",
    ]


def test_fit_scope_gate_on_a_tiny_model(tmp_path: Path) -> None:
    loaded = tiny_loaded()
    config = ScopeConfig(
        open_prompts=_open_prompts(tmp_path / "open.jsonl", 30), max_questions=60, folds=3,
        min_retention=0.95, batch_size=16,
    )  # fmt: skip
    val = _questions(40, offset=1000)
    recipe, weights = fit_scope_gate(loaded, _questions(60), val, config, PromptRecipe())
    assert recipe.hidden_size == weights.weights.size == loaded.model.config.hidden_size
    assert 0.0 < recipe.threshold < 1.0
    assert recipe.training["chosen_C"] in config.c_grid
    assert {row["C"] for row in recipe.training["c_search"]} == set(config.c_grid)
    assert recipe.evaluation["val_questions_in_scope"] >= 0.95
    assert set(recipe.evaluation["open_prompts_rejected_oof_by_category"]) == {"code", "creative"}
    # the runtime gate reproduces the offline probabilities on the same conversations
    gate = ScopeGate(weights.weights, weights.bias, recipe.threshold)
    conversations = [[{"role": "user", "content": q}] for q in val[:8]]
    x = hidden_states(loaded, conversations, batch_size=3)
    direct = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ weights.weights + weights.bias)))
    np.testing.assert_allclose(gate.probabilities(torch.as_tensor(x)).numpy(), direct, atol=1e-5)


def test_too_few_questions_is_a_clear_error(tmp_path: Path) -> None:
    config = ScopeConfig(open_prompts=_open_prompts(tmp_path / "open.jsonl", 12))
    with pytest.raises(ValueError, match="at least 10 train and 10 validation"):
        fit_scope_gate(tiny_loaded(), _questions(5), _questions(20), config, PromptRecipe())
