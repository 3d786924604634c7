"""The knowledge gate: does the model know what the prompt asks about?

A made-up biography is fluent: its tokens look like any other answer's, so a risk pooled
over them dilutes (issue 11). Whether the model knows the entity it is asked about is
readable earlier, from the prompt alone (Ferrando et al. 2025, "Do I Know This Entity?";
cf. Kadavath et al. 2022, "P(IK)"): a logistic regression on the residual stream after one
middle decoder layer gives ``prompt_risk``, the probability that the prompt asks about
something the model has never seen. Two features (the recipe's ``feature``): the state at
the last prompt token (v2), or a token-level probe's logit at every prompt token, max-pooled
(v4: fitted on the coined words of made-up names, so an unknown name counts wherever it
sits, whatever wording follows it). It is known before the first answer token, so the
policy may abstain without generating (`guard.policy`), and it costs one dot product per
prompt token: the prefill computes that state anyway. Trained offline (`probes.knowledge`,
`bench/knowledge_tokens.py`) and stored in the artifact (``knowledge.npz``, the manifest's
``knowledge`` recipe with its flag and abstain thresholds).

    gate = KnowledgeGate.from_probe(probe, model)      # None when the probe has none
    with gate.capture(model) as residual:
        model(input_ids, attention_mask=mask)
    risks = gate.prompt_risks(residual.take_all(), mask)   # one prompt_risk per row
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from guard.errors import CaptureError, ProbeModelMismatchError
from guard.hooks import Hook, PositionCapture
from guard.neurons import find_mlp_layers
from guard.probe import Probe, check_gate_width


def decoder_block(model: nn.Module, layer: int) -> nn.Module:
    """Decoder block ``layer`` (0-based): the module whose output is the residual stream
    after that layer (the one holding MLP ``layer``, whatever the architecture's names)."""
    mlps = find_mlp_layers(model)
    if not 0 <= layer < len(mlps):
        raise ProbeModelMismatchError(
            f"the knowledge gate reads decoder layer {layer}; the model has {len(mlps)}"
        )
    name = mlps[layer].name.split(f".{layer}.")[0] + f".{layer}"
    return model.get_submodule(name)


class ResidualCapture(PositionCapture):
    """Record the residual stream after one decoder block in forward passes; `take` one
    position per row (default: the last). ``block``: that layer's `decoder_block`, when the
    caller has it already."""

    _missing = "no forward pass reached the knowledge gate's layer"

    def __init__(self, model: nn.Module, layer: int, *, block: nn.Module | None = None) -> None:
        block = decoder_block(model, layer) if block is None else block
        super().__init__(model, f"layer {layer} residual stream", [Hook(block, self._record)])

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor):
            raise CaptureError(f"{type(module).__name__} returned no hidden-state tensor")
        self._keep(hidden)

    def take_all(self) -> torch.Tensor:
        """The newest pass's states at every position, ``[batch, seq, hidden]`` float32."""
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise CaptureError(self._missing)
        return hidden.float()


class KnowledgeGate:
    """A probe's knowledge gate: residual states in, ``prompt_risk`` per row out."""

    def __init__(
        self, weights: torch.Tensor, bias: float, layer: int, *, pooled: bool = False
    ) -> None:
        self.weights = weights.float()
        self.bias = float(bias)
        self.layer = int(layer)
        self.pooled = pooled  # max over every prompt token's logit (else: the last token's)
        # each model's block, found once (every prompt pass captures)
        self._blocks: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()

    @classmethod
    def from_probe(cls, probe: Probe, hidden_size: int) -> KnowledgeGate | None:
        """The probe's gate for a model of ``hidden_size``; None when the probe has none."""
        recipe, weights = probe.manifest.knowledge, probe.knowledge
        if recipe is None or weights is None:
            return None
        check_gate_width(probe, "knowledge", recipe.hidden_size, hidden_size)
        pooled = recipe.feature == "residual_max_prompt_token"
        return cls(torch.as_tensor(weights.weights), weights.bias, recipe.layer, pooled=pooled)

    def capture(self, model: nn.Module) -> ResidualCapture:
        block = self._blocks.get(model)
        if block is None:
            block = self._blocks[model] = decoder_block(model, self.layer)
        return ResidualCapture(model, self.layer, block=block)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate's logit ``w . x + b`` of every state in ``hidden`` ``[..., hidden]``."""
        return hidden.float() @ self.weights.to(hidden.device) + self.bias

    def risks(self, hidden: torch.Tensor) -> list[float]:
        """``prompt_risk`` per row of ``hidden`` ``[batch, hidden]``: for the last-token
        feature, those states; for the pooled one, each row's state already chosen."""
        return risks_of(self.logits(hidden))

    def prompt_logits(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each prompt's logit from its states ``[batch, seq, hidden]`` (``mask``: 1 where a
        position holds a prompt token; left padding): the last position's, or for the
        pooled feature the max over the masked positions."""
        if not self.pooled:
            return self.logits(hidden[:, -1])
        return masked_max(self.logits(hidden), mask)

    def prompt_risks(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
        return risks_of(self.prompt_logits(hidden, mask))


def masked_max(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's max of ``logits`` ``[batch, seq]`` over the positions ``mask`` keeps."""
    if mask is not None:
        logits = logits.masked_fill(mask.to(logits.device) == 0, float("-inf"))
    return logits.max(dim=-1).values


def risks_of(logits: torch.Tensor) -> list[float]:
    """``prompt_risk`` per gate logit."""
    return [float(p) for p in torch.sigmoid(logits.double()).tolist()]
