"""The scope gate: is this prompt one the probe can judge (a short factual question)?

The probe learned what hallucinated *short factual answers* look like. On chit-chat,
creative writing or code its risk means little (a haiku "looks like" a made-up answer),
so a probe artifact may carry a gate: a logistic regression on the model's final hidden
state (the LM head's input) at the last prompt token, where the model is about to
answer. The gate costs one dot product per request: generation computes that state
anyway. Trained offline by `probes.scope` and stored in the artifact (`scope.npz`, the
manifest's `scope` recipe with its threshold).

Out of scope, the answer's risk is still computed and reported, but the policy neither
flags, abstains nor aborts: the decision is ``pass`` and ``guard.scope.in_scope`` is
false. Artifacts without a gate judge every prompt.

    gate = ScopeGate.from_probe(probe, model)         # None when the probe has no gate
    with FinalHiddenCapture(model) as hidden:
        model(input_ids, logits_to_keep=1)
    verdicts = gate.judge(hidden.take())             # one ScopeVerdict per row
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.errors import CaptureError
from guard.hooks import Hook, PositionCapture
from guard.probe import Probe, check_gate_width
from guard.results import ScopeVerdict


def _lm_head(model: nn.Module) -> nn.Module:
    """The model's output embeddings (transformers' ``get_output_embeddings``)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        raise CaptureError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


class FinalHiddenCapture(PositionCapture):
    """Record the LM head's input (the final hidden states) of forward passes; `take` one
    position per row (default: the last one, which is also the only one when the model is
    called with ``logits_to_keep=1``)."""

    _missing = "no forward pass reached the LM head inside the capture"

    def __init__(self, model: nn.Module) -> None:
        head = _lm_head(model)
        super().__init__(model, "final hidden state", [Hook(head, self._record, pre=True)])

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._keep(args[0])


class ScopeGate:
    """A probe's scope gate bound to a model: ``judge`` hidden states into verdicts."""

    def __init__(self, weights: np.ndarray, bias: float, threshold: float) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.bias = float(bias)
        self.threshold = float(threshold)

    @classmethod
    def from_probe(
        cls, probe: Probe, model: nn.Module, threshold: float | None = None
    ) -> ScopeGate | None:
        """The probe's gate, checked against the model's hidden size; None without one.
        ``threshold`` overrides the manifest's (``GUARD_SCOPE_THRESHOLD``)."""
        if probe.manifest.scope is None or probe.scope is None:
            return None
        head = _lm_head(model)
        weight = getattr(head, "weight", None)
        hidden = int(weight.shape[1]) if isinstance(weight, torch.Tensor) else -1
        return cls.for_hidden_size(probe, hidden, threshold)

    @classmethod
    def for_hidden_size(
        cls, probe: Probe, hidden: int, threshold: float | None = None
    ) -> ScopeGate | None:
        """`from_probe` for a model known by its hidden size (an engine that holds none)."""
        recipe, weights = probe.manifest.scope, probe.scope
        if recipe is None or weights is None:
            return None
        check_gate_width(probe, "scope", recipe.hidden_size, hidden)
        chosen = recipe.threshold if threshold is None else threshold
        return cls(weights.weights, weights.bias, chosen)

    def probabilities(self, hidden: torch.Tensor) -> torch.Tensor:
        """``p(in scope)`` per row of ``hidden`` ``[batch, hidden]``."""
        return torch.sigmoid(hidden.float() @ self.weights.to(hidden.device) + self.bias)

    def judge(self, hidden: torch.Tensor) -> list[ScopeVerdict]:
        return [
            ScopeVerdict(in_scope=p >= self.threshold, score=p)
            for p in self.probabilities(hidden).tolist()
        ]
