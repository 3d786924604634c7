"""Prompt-level knowledge signals, known before the first token (issue 11).

Two designs were measured (docs/LONGFORM.md):

- `fit_knowledge_probe`: will this prompt's answer be hallucinated (P(IK), Kadavath et al.
  2022)? A logistic regression on the final hidden state at the last prompt token, label
  1 = the greedy answer is hallucinated (`probes.judge`). It did not separate made-up
  entities from the model's correct answers (validation AUROC 0.59) and is not served.
- `fit_knowledge_gate`: does the prompt ask about something the model has never seen
  (Ferrando et al. 2025, "Do I Know This Entity?")? A logistic regression on the residual
  stream after a middle decoder layer at the last prompt token, label 1 = a made-up entity
  (`probes.madeup`), 0 = a real one (TriviaQA questions in every phrasing, requests about
  real entities in the generator's own templates, so that the templates carry no label).
  Served as the artifact's knowledge gate (`guard.knowledge`); its input is computed by
  the runtime's own `ResidualCapture` (`residual_states`), so there is no train/serve skew.

    fit = fit_knowledge_probe(x, y, groups)
    states = residual_states(loaded, prompt_ids, layer=15)
    recipe, weights = fit_knowledge_gate(states[fit], y[fit], layer=15, c=0.1,
                                         flag_checks=[(states[v], 0.08)], abstain_checks=...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from guard.forcing import position_ids_for
from guard.knowledge import ResidualCapture, decoder_block
from guard.kvbatch import run_until
from guard.model import LoadedModel, left_pad, pad_token_id
from guard.probe import GateWeights, KnowledgeRecipe
from probes.metrics import auroc
from probes.scope import fit_raw_logistic

# A check on a threshold: logits of prompts of one kind and the most of them it may flag.
Check = tuple[np.ndarray, float]

SYSTEM_MESSAGE = "You are a helpful assistant."
RENDERINGS = ("plain", "short_instruction", "long_instruction", "system")


def render(prompt: str, style: str) -> list[dict[str, str]]:
    """One prompt as chat messages, worded one of `RENDERINGS` ways: as typed (one user
    message); with the shipped recipe's instruction appended ("Answer in a few words.") or
    the long-form one ("Answer in two or three sentences."); after a generic system message.
    The gate must not learn the wording: its fit and its measurements use all four."""
    from guard.probe import PromptRecipe
    from probes.longform import LONG_RECIPE

    if style == "plain":
        return [{"role": "user", "content": prompt}]
    if style == "short_instruction":
        return PromptRecipe().messages(prompt)
    if style == "long_instruction":
        return LONG_RECIPE.messages(prompt)
    if style == "system":
        return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]
    raise ValueError(f"unknown rendering {style!r}: one of {', '.join(RENDERINGS)}")


@dataclass(frozen=True)
class KnowledgeFit:
    """Raw-unit weights ``[hidden]`` and bias, the out-of-fold logits of the fitting rows
    (from the chosen C) and the C search."""

    weights: np.ndarray
    bias: float
    oof_logits: np.ndarray
    c: float
    search: list[dict[str, Any]]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias


def fit_knowledge_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    c_grid: Sequence[float] = (0.001, 0.01, 0.1),
    folds: int = 5,
    seed: int = 0,
) -> KnowledgeFit:
    """Grouped CV over ``c_grid`` (best out-of-fold AUROC), then a fit on every row."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(x, y, groups))
    search = []
    oof_by_c: dict[float, np.ndarray] = {}
    for c in c_grid:
        oof = np.zeros(len(y))
        for fit_rows, held in splits:
            weights, bias = fit_raw_logistic(x[fit_rows], y[fit_rows], c, seed)
            oof[held] = x[held] @ weights + bias
        oof_by_c[c] = oof
        search.append({"C": c, "oof_auroc": auroc(y, oof)})
    best = max(search, key=lambda row: (row["oof_auroc"], -row["C"]))
    weights, bias = fit_raw_logistic(x, y, best["C"], seed)
    return KnowledgeFit(weights, bias, oof_by_c[best["C"]], best["C"], search)


def residual_states(
    loaded: LoadedModel, prompts: Sequence[list[int]], layer: int, batch_size: int = 32
) -> np.ndarray:
    """The knowledge gate's input for every prompt (token ids): the residual stream after
    decoder layer ``layer`` at the last prompt token, ``[n, hidden]`` float32, read by the
    runtime's `ResidualCapture` in left-padded, length-sorted batches (original order)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    model, pad_id = loaded.model, pad_token_id(loaded.tokenizer)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: np.ndarray | None = None
    device = next(model.parameters()).device
    # the pass stops after the gate's layer: the later layers and the LM head add nothing
    with torch.inference_mode(), ResidualCapture(model, layer) as residual:
        for start in tqdm(range(0, len(order), batch_size), desc="residual states", unit="batch"):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([list(prompts[i]) for i in rows], pad_id)
            inputs = {
                "input_ids": ids.to(device), "attention_mask": mask.to(device),
                "position_ids": position_ids_for(mask).to(device), "use_cache": False,
            }  # fmt: skip
            run_until(model, inputs, decoder_block(model, layer))
            states = residual.take().cpu().numpy()
            if out is None:
                out = np.zeros((len(prompts), states.shape[1]), dtype=np.float32)
            out[rows] = states
    assert out is not None
    return out


def line_for(checks: Sequence[Check]) -> float:
    """The lowest logit line that flags (``z >= line``) at most each check's share of its
    prompts: halfway between the highest logit it must pass and the next higher one (so
    the line survives the conversion to a probability)."""
    lines = []
    for z, share in checks:
        ordered = np.sort(np.asarray(z, dtype=np.float64))
        allowed = int(np.floor(share * len(ordered)))  # prompts that may sit at or above it
        if allowed >= len(ordered):
            lines.append(-np.inf)
            continue
        highest_passed = ordered[len(ordered) - allowed - 1]
        above = ordered[ordered > highest_passed]
        lines.append((highest_passed + above[0]) / 2 if above.size else highest_passed + 1.0)
    return float(max(lines))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


def fit_knowledge_gate(
    x: np.ndarray,
    y: np.ndarray,
    *,
    layer: int,
    c: float,
    flag_checks: dict[str, Check],
    abstain_checks: dict[str, Check],
    training: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[KnowledgeRecipe, GateWeights]:
    """Fit the gate (standardised, class-balanced L2 logistic regression, folded into raw
    units) and put its flag and abstain lines where every check allows. The checks hold
    *validation* prompts' states, not logits: ``{name: (states, most flagged share)}``."""
    weights, bias = fit_raw_logistic(np.asarray(x, dtype=np.float64), np.asarray(y), c, seed)

    def logits(states: np.ndarray) -> np.ndarray:
        return np.asarray(states, dtype=np.float64) @ weights + bias

    flag = line_for([(logits(s), share) for s, share in flag_checks.values()])
    abstain = max(flag, line_for([(logits(s), share) for s, share in abstain_checks.values()]))
    evaluation = {
        name: {
            "n": int(len(states)),
            "flagged": float(np.mean(logits(states) >= flag)),
            "abstained": float(np.mean(logits(states) >= abstain)),
        }
        for name, (states, _) in flag_checks.items()
    }
    recipe = KnowledgeRecipe(
        layer=layer,
        hidden_size=int(np.asarray(x).shape[1]),
        flag=_sigmoid(flag),
        abstain=_sigmoid(abstain),
        training={
            **(training or {}),
            "rows": int(len(y)),
            "made_up_rows": int(np.sum(y)),
            "model": "StandardScaler + L2 logistic regression, class_weight='balanced', "
            f"C={c}, folded into raw units",
            "flag_rule": {name: share for name, (_, share) in flag_checks.items()},
            "abstain_rule": {name: share for name, (_, share) in abstain_checks.items()},
        },
        evaluation=evaluation,
    )
    return recipe, GateWeights(weights.astype(np.float64), float(bias))
