"""The one place where captured neurons and logit statistics become risk.

Every number the guard shows is computed here, and every engine, the teacher-forced
scorer and the offline evaluator call it (docs/ARCHITECTURE.md, "Scoring"):
- token probe logit ``s_t = bias + sum_{(l,j)} w_lj * CETT_{l,j,t}``, read where token
  ``t`` is the *input* of the forward pass, together with each layer's part of the sum
  (`RiskScorer.measure`, one matrix product on the flat ``[..., K]`` capture);
- logit statistics of token ``t`` come from the raw logits at the position that
  *predicted* it: ``logprob_t`` and full-vocabulary ``entropy_t`` (`logit_statistics`);
- answer features: mean ``s_t`` (the probe logit, exact because the probe is linear),
  ``length``, mean/min logprob, mean/max entropy, all over the response tokens
  (`AnswerStats`, or `RunningStats` token by token);
- ``z`` = the stacker on those (or the probe logit when there is no stacker);
  answer risk = calibrator(z) (`RiskScorer.answer_risk`); a token's display risk is the
  same formula on that token alone (`RiskScorer.token_risk`).

    scorer = RiskScorer(probe)
    with NeuronCapture(model, scorer.neuron_selection()) as capture: ...
    measured = scorer.measure(scorer.flatten(dict(capture.items())))  # [batch, tokens, 1 + L]
    score = scorer.score_answer(measured[0, a:b], logprobs, entropies)
    score.risk, score.token_risks, score.layers
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from guard.probe import Probe, ScoringRecipe


def logit_statistics(
    logits: torch.Tensor, next_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``next_ids`` and the entropy of the raw distribution.

    ``logits`` ``[..., vocab]`` (temperature 1, no processing), ``next_ids`` ``[...]``.
    Returns two float32 tensors shaped like ``next_ids``.
    """
    logp, entropy = log_probs_and_entropy(logits)
    with torch.no_grad():
        token_logp = logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    return token_logp, entropy


def log_probs_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw distribution's log-probabilities ``[..., vocab]`` (float32) and entropy
    ``[...]``: the part of `logit_statistics` that needs no sampled token."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp, -torch.linalg.vecdot(logp.exp(), logp)


@dataclass(frozen=True)
class AnswerStats:
    """Pooled features of one answer (or of its first tokens, while streaming)."""

    probe_logit: float
    length: int
    mean_logprob: float
    min_logprob: float
    mean_entropy: float
    max_entropy: float

    @classmethod
    def from_tokens(
        cls, token_logits: np.ndarray, logprobs: np.ndarray, entropies: np.ndarray
    ) -> AnswerStats:
        """Pool per-token values ``[tokens]`` of one answer (at least one token)."""
        s = np.asarray(token_logits, dtype=np.float64)
        lp = np.asarray(logprobs, dtype=np.float64)
        ent = np.asarray(entropies, dtype=np.float64)
        if s.size == 0 or s.shape != lp.shape or s.shape != ent.shape:
            raise ValueError(
                f"need equal, non-empty token arrays: {s.shape}, {lp.shape}, {ent.shape}"
            )
        return cls(
            probe_logit=float(s.mean()),
            length=int(s.size),
            mean_logprob=float(lp.mean()),
            min_logprob=float(lp.min()),
            mean_entropy=float(ent.mean()),
            max_entropy=float(ent.max()),
        )

    def stat(self, name: str) -> float:
        return float(getattr(self, name))


@dataclass(frozen=True)
class AnswerScore:
    """The scorer's verdict-free account of one answer: its risk and where it came from.

    ``token_risks`` ``[tokens]``; ``layers``: each probe layer's signed share of the probe
    logit (`RiskScorer.layer_shares`).
    """

    risk: float
    token_risks: np.ndarray
    layers: dict[int, float]
    stats: AnswerStats


class RiskScorer:
    """Apply a probe's scoring recipe: neurons to token logits, answer stats to risk.

    The capture order is the probe's layers ascending, each layer's neurons in the
    probe's order: `flatten` builds it from per-layer tensors, `NeuronCapture.pop_last`
    produces it directly.
    """

    def __init__(self, probe: Probe, device: torch.device | str = "cpu") -> None:
        self.probe = probe
        self.recipe: ScoringRecipe = probe.manifest.scoring
        self._bias = float(probe.weights.bias)
        by_layer = probe.weights.by_layer()
        self.layers: list[int] = sorted(by_layer)
        self._selection = {layer: by_layer[layer][0].tolist() for layer in self.layers}
        # [K, layers]: neuron k's weight in its own layer's column, so one product gives
        # every layer's part of s_t; their sum plus the bias is s_t itself.
        width = sum(len(neurons) for neurons in self._selection.values())
        per_layer = torch.zeros((width, len(self.layers)), dtype=torch.float32)
        row = 0
        for column, layer in enumerate(self.layers):
            weights = torch.as_tensor(by_layer[layer][1], dtype=torch.float32)
            per_layer[row : row + weights.numel(), column] = weights
            row += weights.numel()
        self._per_layer = per_layer.to(device)

    def neuron_selection(self) -> dict[int, list[int]]:
        """``{layer: [neuron, ...]}`` to capture, layers ascending: only what the probe weighs."""
        return {layer: list(neurons) for layer, neurons in self._selection.items()}

    def flatten(self, cett: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-layer CETT ``{layer: [..., k_layer]}`` (the probe's neurons, in order) as one
        ``[..., K]`` tensor in capture order. Extra layers in ``cett`` are ignored."""
        if not self.layers:  # a probe with no neuron left: only the shape matters
            any_cett = next(iter(cett.values()))
            return any_cett.new_zeros((*any_cett.shape[:-1], 0))
        return torch.cat([cett[layer].float() for layer in self.layers], dim=-1)

    def measure(self, cett: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` CETT to ``[..., 1 + layers]``: the token probe logit ``s_t`` and each
        probe layer's part of it (``s_t = bias + sum of the parts``)."""
        parts = cett.float() @ self._per_layer.to(cett.device)
        return torch.cat([parts.sum(dim=-1, keepdim=True) + self._bias, parts], dim=-1)

    def stack(self, stats: AnswerStats) -> float:
        """``z`` for one answer: the stacker, or the probe logit alone."""
        stacker = self.recipe.stacker
        if stacker is None:
            return stats.probe_logit
        z = stacker.intercept + stacker.probe_coef * stats.probe_logit
        for name, coef in stacker.coef.items():
            z += coef * stats.stat(name)
        return float(z)

    def calibrate(self, z: np.ndarray | float) -> np.ndarray:
        """Calibrated risk in [0, 1] for stacked scores ``z``."""
        return np.clip(self.recipe.calibrator(np.asarray(z, dtype=np.float64)), 0.0, 1.0)

    def answer_risk(self, stats: AnswerStats) -> float:
        """The served risk of a whole answer (or of the tokens so far, while streaming)."""
        return float(self.calibrate(self.stack(stats)))

    def token_risk(self, token_logit: float, logprob: float, entropy: float, index: int) -> float:
        """Display risk of the token at ``index``: scored as if it were the answer, with its
        own probe logit, log-prob and entropy and the answer length so far (``index + 1``).
        It shows *where* the risk comes from; the answer risk is not the tokens' mean (it
        pools before calibrating)."""
        stats = AnswerStats(token_logit, index + 1, logprob, logprob, entropy, entropy)
        return self.answer_risk(stats)

    def token_risks(
        self, token_logits: np.ndarray, logprobs: np.ndarray, entropies: np.ndarray
    ) -> np.ndarray:
        """`token_risk` of every token of one answer: ``[tokens]``."""
        values = zip(token_logits, logprobs, entropies, strict=True)
        risks = [
            self.token_risk(float(s), float(lp), float(e), t) for t, (s, lp, e) in enumerate(values)
        ]
        return np.asarray(risks, dtype=np.float64)

    def span_risks(
        self,
        token_logits: np.ndarray,
        logprobs: np.ndarray,
        entropies: np.ndarray,
        ranges: Sequence[tuple[int, int]],
    ) -> list[float]:
        """The risk of each token range ``[start, stop)`` of one answer (a sentence): the
        answer risk of its tokens alone, as if the range were the whole answer."""
        return [
            self.answer_risk(
                AnswerStats.from_tokens(token_logits[a:b], logprobs[a:b], entropies[a:b])
            )
            for a, b in ranges
        ]

    def layer_shares(self, part_sums: np.ndarray, length: int) -> dict[int, float]:
        """Each probe layer's signed share of the answer's probe logit from the sums of its
        parts over the answer's tokens ``[layers]`` (the shares' absolute values sum to 1)."""
        if length == 0 or not self.layers:
            return {}
        sums = np.asarray(part_sums, dtype=np.float64)
        total = float(np.abs(sums).sum())
        return {
            layer: (float(v) / total if total > 0 else 0.0)
            for layer, v in zip(self.layers, sums, strict=True)
        }

    def score_answer(
        self, measured: torch.Tensor | np.ndarray, logprobs: np.ndarray, entropies: np.ndarray
    ) -> AnswerScore:
        """Score one whole answer from its `measure` rows ``[tokens, 1 + layers]`` and the
        logit statistics of its tokens ``[tokens]``."""
        values = np.asarray(measured, dtype=np.float64)
        token_logits = values[:, 0]
        stats = AnswerStats.from_tokens(token_logits, logprobs, entropies)
        return AnswerScore(
            risk=self.answer_risk(stats),
            token_risks=self.token_risks(token_logits, logprobs, entropies),
            layers=self.layer_shares(values[:, 1:].sum(axis=0), len(token_logits)),
            stats=stats,
        )


class RunningStats:
    """Streaming pooling of one answer's token values; exact at every prefix.

    running = RunningStats()
    running.update(s_t, logprob_t, entropy_t)
    scorer.answer_risk(running.stats())
    """

    def __init__(self) -> None:
        self._n = 0
        self._sum_s = 0.0
        self._sum_lp = 0.0
        self._min_lp = float("inf")
        self._sum_ent = 0.0
        self._max_ent = float("-inf")

    @property
    def length(self) -> int:
        return self._n

    def update(self, token_logit: float, logprob: float, entropy: float) -> None:
        self._n += 1
        self._sum_s += token_logit
        self._sum_lp += logprob
        self._min_lp = min(self._min_lp, logprob)
        self._sum_ent += entropy
        self._max_ent = max(self._max_ent, entropy)

    def stats(self) -> AnswerStats:
        if self._n == 0:
            raise ValueError("no token seen yet")
        return AnswerStats(
            probe_logit=self._sum_s / self._n,
            length=self._n,
            mean_logprob=self._sum_lp / self._n,
            min_logprob=self._min_lp,
            mean_entropy=self._sum_ent / self._n,
            max_entropy=self._max_ent,
        )
