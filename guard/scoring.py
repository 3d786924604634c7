"""Per-token and per-answer risk from captured neurons and logit statistics.

One implementation for training-time evaluation, teacher-forced scoring and live
generation, so the served score is the evaluated score.

Definitions (ARCHITECTURE.md):
- token probe logit ``s_t = bias + sum_{(l,j)} w_lj * CETT_{l,j,t}``, read where token
  ``t`` is the *input* of the forward pass;
- logit statistics of token ``t`` come from the raw logits at the position that
  *predicted* it: ``logprob_t`` and full-vocabulary ``entropy_t``;
- answer features: mean ``s_t`` (the probe logit, exact because the probe is linear),
  ``length``, mean/min logprob, mean/max entropy, all over the response tokens;
- ``z`` = the stacker on those (or the probe logit when there is no stacker);
  answer risk = calibrator(z).

    scorer = RiskScorer(probe)
    with NeuronCapture(model, scorer.neuron_selection()) as capture: ...
    s = scorer.token_logits(dict(capture.items()))          # [batch, tokens]
    risk = scorer.answer_risk(AnswerStats.from_tokens(s[0, a:b], lp, ent))
"""

from __future__ import annotations

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
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        token_logp = logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
    return token_logp, entropy


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


class RiskScorer:
    """Apply a probe's scoring recipe: neurons to token logits, answer stats to risk."""

    def __init__(self, probe: Probe, device: torch.device | str = "cpu") -> None:
        self.probe = probe
        self.recipe: ScoringRecipe = probe.manifest.scoring
        self._bias = float(probe.weights.bias)
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            layer: (
                torch.as_tensor(neurons, dtype=torch.long),
                torch.as_tensor(weights, dtype=torch.float32, device=device),
            )
            for layer, (neurons, weights) in probe.weights.by_layer().items()
        }

    def neuron_selection(self) -> dict[int, list[int]]:
        """``{layer: [neuron, ...]}`` to capture: only what the probe weighs."""
        return {layer: idx.tolist() for layer, (idx, _) in self._layers.items()}

    def token_logits(self, cett: dict[int, torch.Tensor]) -> torch.Tensor:
        """``s_t`` from captured CETT ``{layer: [batch, tokens, k_layer]}`` -> ``[batch, tokens]``.

        ``cett`` must hold exactly the neurons of `neuron_selection`, in that order.
        """
        total: torch.Tensor | None = None
        for layer, (_, weights) in self._layers.items():
            part = cett[layer].float() @ weights.to(cett[layer].device)
            total = part if total is None else total + part
        if total is None:  # a probe with no neuron left: the bias alone
            any_cett = next(iter(cett.values()))
            total = torch.zeros(any_cett.shape[:2], device=any_cett.device)
        return total + self._bias

    def layer_shares(self, cett: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each layer's contribution to the token logits (``[batch, tokens]`` per layer)."""
        return {
            layer: cett[layer].float() @ weights.to(cett[layer].device)
            for layer, (_, weights) in self._layers.items()
        }

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

    def token_risks(
        self, token_logits: np.ndarray, logprobs: np.ndarray, entropies: np.ndarray
    ) -> np.ndarray:
        """Per-token display risk ``[tokens]``: each token scored as if it were the answer.

        Token ``t`` uses its own probe logit, log-prob and entropy, and the answer length so
        far (``t + 1``). This shows *where* the risk comes from; the answer risk is not their
        mean (it pools before calibrating).
        """
        risks = [
            self.answer_risk(
                AnswerStats(float(s), t + 1, float(lp), float(lp), float(ent), float(ent))
            )
            for t, (s, lp, ent) in enumerate(zip(token_logits, logprobs, entropies, strict=True))
        ]
        return np.asarray(risks, dtype=np.float64)


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
