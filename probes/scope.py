"""Fit the scope gate: which prompts are short factual questions the probe can judge.

In scope: the dataset's questions, put to the model as users send them (each in one of
three phrasings drawn at random: as written, in lower case without a question mark, or
with the probe's short-answer instruction).
Out of scope: `probes/data/open_prompts.jsonl`, 420 hand-written prompts that are not
factual questions (chit-chat, creative writing, code, instructions, advice, long
answers, arithmetic and puzzles), as written and in lower case. The feature is the
model's final hidden state at the last prompt token (`guard.forcing.prompt_hidden`, the
very pass the runtime reads); the gate is a standardised L2 logistic regression, C chosen
by grouped cross-validation (every variant of a prompt in the same fold), the scaling
folded into raw weights.

The threshold keeps ``min_retention`` of the *validation* split's questions in scope
(questions the gate never saw); out-of-fold rejection of the open prompts is reported at
that threshold, per category. The held-out check on other prompts is `bench/scope.py`.

    recipe, weights = fit_scope_gate(loaded, train_questions, val_questions, ScopeConfig())
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from guard.forcing import prompt_hidden
from guard.model import LoadedModel, encode_chats, pad_token_id
from guard.probe import GateWeights, PromptRecipe, ScopeRecipe
from probes.metrics import auroc

log = logging.getLogger(__name__)

OPEN_PROMPTS = Path(__file__).parent / "data" / "open_prompts.jsonl"


class ScopeConfig(BaseModel):
    """How the gate is fitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    open_prompts: Path = OPEN_PROMPTS
    max_questions: int = Field(default=1500, ge=10)  # train-split questions used (file order)
    max_val_questions: int = Field(default=600, ge=10)  # validation questions for the threshold
    min_retention: float = Field(default=0.99, gt=0.5, le=1.0)
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    folds: int = Field(default=5, ge=2)
    batch_size: int = Field(default=32, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class OpenPrompt:
    id: str
    category: str
    prompt: str


def load_open_prompts(path: Path) -> list[OpenPrompt]:
    """The out-of-scope prompts (JSONL: ``id``, ``category``, ``prompt``)."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(OpenPrompt(str(row["id"]), str(row["category"]), str(row["prompt"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not an open-prompt row: {exc}") from exc
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def question_variants(question: str, recipe: PromptRecipe) -> list[list[dict[str, str]]]:
    """A factual question as users send it: as written, lower case without the question
    mark, and with the probe's short-answer instruction."""
    plain = question.strip()
    casual = plain.rstrip("?").strip().lower()
    return [
        [{"role": "user", "content": plain}],
        [{"role": "user", "content": casual}],
        recipe.messages(plain),
    ]


def open_variants(prompt: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": prompt}], [{"role": "user", "content": prompt.lower()}]]


def hidden_states(
    loaded: LoadedModel,
    conversations: Sequence[list[dict[str, str]]],
    batch_size: int,
    recipe: PromptRecipe | None = None,
) -> np.ndarray:
    """The gate's feature for every conversation, rendered as serving renders it (the
    probe's ``recipe``): ``[n, hidden]`` float32 (length-sorted batches, original order)."""
    prompts, _, _ = encode_chats(loaded.tokenizer, [list(c) for c in conversations], recipe)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    pad_id = pad_token_id(loaded.tokenizer)
    out: np.ndarray | None = None
    for start in tqdm(range(0, len(order), batch_size), desc="scope features", unit="batch"):
        rows = order[start : start + batch_size]
        hidden = prompt_hidden(loaded.model, [prompts[i] for i in rows], pad_id).numpy()
        if out is None:
            out = np.zeros((len(prompts), hidden.shape[1]), dtype=np.float32)
        out[rows] = hidden
    if out is None:
        raise ValueError("no prompts to measure")
    return out


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[StandardScaler, Any]:
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
    return scaler, model.fit(scaler.transform(x), y)


def fit_raw_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    """A standardised, class-balanced L2 logistic regression with the scaling folded into
    raw weights: ``logit = x @ w + b`` (what a gate or prompt probe serves)."""
    scaler, model = _fit(x, y, c, seed)
    scale = scaler.scale_
    weights = model.coef_[0] / scale
    bias = float(model.intercept_[0] - np.sum(model.coef_[0] * scaler.mean_ / scale))
    return weights.astype(np.float64), bias


def _out_of_fold(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float, config: ScopeConfig
) -> np.ndarray:
    folds = StratifiedGroupKFold(config.folds, shuffle=True, random_state=config.seed)
    p = np.zeros(len(y))
    for fit_rows, held in folds.split(x, y, groups):
        scaler, model = _fit(x[fit_rows], y[fit_rows], c, config.seed)
        p[held] = model.predict_proba(scaler.transform(x[held]))[:, 1]
    return p


def _rejected(p_out: np.ndarray, threshold: float) -> float:
    return float(np.mean(p_out < threshold))


def fit_scope_gate(
    loaded: LoadedModel,
    train_questions: Sequence[str],
    val_questions: Sequence[str],
    config: ScopeConfig,
    recipe: PromptRecipe,
    extra_in_scope: Sequence[list[dict[str, str]]] = (),
) -> tuple[ScopeRecipe, GateWeights]:
    """Fit the gate on train questions (and ``extra_in_scope`` conversations, such as
    long-form requests about named entities) vs the open prompts; threshold from val
    questions."""
    opens = load_open_prompts(config.open_prompts)
    questions = list(train_questions)[: config.max_questions]
    val_questions = list(val_questions)[: config.max_val_questions]
    if len(questions) < 10 or len(val_questions) < 10:
        raise ValueError("the scope gate needs at least 10 train and 10 validation questions")
    rng = np.random.default_rng(config.seed)

    def phrased(question: str) -> list[dict[str, str]]:
        variants = question_variants(question, recipe)
        return variants[int(rng.integers(len(variants)))]

    conversations = [phrased(question) for question in questions] + list(extra_in_scope)
    labels = [1] * len(conversations)
    groups = list(range(len(conversations)))
    first_open = len(conversations)
    categories: list[str] = []
    for j, item in enumerate(opens):
        variants = open_variants(item.prompt)
        conversations += variants
        labels += [0] * len(variants)
        groups += [first_open + j] * len(variants)
        categories += [item.category] * len(variants)
    val_conversations = [phrased(question) for question in val_questions]
    features = hidden_states(loaded, conversations + val_conversations, config.batch_size, recipe)
    x, x_val = features[: len(conversations)], features[len(conversations) :]
    y, group = np.asarray(labels), np.asarray(groups)

    search: list[dict[str, float]] = []
    oof: dict[float, np.ndarray] = {}
    for c in config.c_grid:
        oof[c] = p = _out_of_fold(x, y, group, c, config)
        threshold = float(np.quantile(p[y == 1], 1.0 - config.min_retention))
        search.append(
            {"C": c, "oof_auroc": auroc(y, p), "oof_open_rejected": _rejected(p[y == 0], threshold)}
        )
    best = max(search, key=lambda row: (row["oof_open_rejected"], -row["C"]))
    weights, bias = fit_raw_logistic(x, y, best["C"], config.seed)
    p_val = 1.0 / (1.0 + np.exp(-(x_val.astype(np.float64) @ weights + bias)))
    threshold = float(np.quantile(p_val, 1.0 - config.min_retention))
    p_open = oof[best["C"]][y == 0]
    per_category = {
        category: _rejected(p_open[np.asarray(categories) == category], threshold)
        for category in sorted(set(categories))
    }
    recipe_out = ScopeRecipe(
        hidden_size=int(x.shape[1]),
        threshold=threshold,
        training={
            "in_scope": f"{len(questions)} train-split questions, one of 3 phrasings each",
            **({"extra_in_scope": len(extra_in_scope)} if extra_in_scope else {}),
            "out_of_scope": f"{len(opens)} prompts x 2 phrasings ({config.open_prompts.name})",
            "model": "StandardScaler + L2 logistic regression, class_weight='balanced'",
            "c_search": search,
            "chosen_C": best["C"],
            "threshold_rule": f"keeps {config.min_retention:.0%} of validation questions",
        },
        evaluation={
            "val_questions_in_scope": float(np.mean(p_val >= threshold)),
            "val_questions": len(val_questions),
            "open_prompts_rejected_oof": _rejected(p_open, threshold),
            "open_prompts_rejected_oof_by_category": per_category,
        },
    )
    log.info("scope gate: C=%s, threshold %.4f, %s", best["C"], threshold, recipe_out.evaluation)
    return recipe_out, GateWeights(weights.astype(np.float64), bias)
