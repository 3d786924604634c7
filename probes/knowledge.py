"""The prompt-level knowledge probe: will the model's answer to this prompt be hallucinated?

Known before the first token: a logistic regression on the model's final hidden state at
the last prompt token (the very state the scope gate reads, `guard.scope`), label 1 = the
greedy answer is hallucinated (`probes.judge`: not correct and not a refusal). Fitted on
TriviaQA train questions (short and long form, and the short questions as users type
them, labelled by the short answer) and made-up entities from `probes.madeup` (every
substantive answer hallucinated), with real-entity requests as known examples. C is
chosen by grouped cross-validation (every phrasing of a question in one fold), whose
out-of-fold logits also feed any second-stage stacker without leaking.

    fit = fit_knowledge_probe(x, y, groups)
    logit = x_new @ fit.weights + fit.bias
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from probes.metrics import auroc
from probes.scope import fit_raw_logistic


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
