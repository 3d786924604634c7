"""The guard's methods on vLLM's worker: ``worker_extension_cls`` (vLLM's mechanism for
adding methods to its workers), called by name through ``collective_rpc`` in whatever
process the worker runs. Arguments and results are plain data (vLLM serialises them with
msgpack between processes; nothing here needs pickling).

- `hguard_fingerprint`: the fingerprint of the weights vLLM computes with;
- `hguard_install`: load and verify the probe in the worker (same directory, same manifest
  hash as the API process verified), enter the `StepCapture`, publish its frames to the
  API process's `FrameReader` address;
- `hguard_pause` / `hguard_resume`: remove and re-register the hooks (the overhead bench's
  plain side); `hguard_uninstall`: remove them and close the channel.

    llm.collective_rpc("hguard_install", args=(probe_dir, sha256, knowledge_layer, address))
"""

from __future__ import annotations

from typing import Any

import torch

from guard.knowledge import KnowledgeGate
from guard.model import fingerprint_model
from guard.neurons import find_mlp_layers
from guard.probe import load_probe
from guard.scoring import RiskScorer
from guard.vllm_engine.capture import StepCapture
from guard.vllm_engine.channel import FramePublisher

EXTENSION = f"{__name__}.GuardExtension"  # the qualified name vLLM's config takes


def _executed_weight(module: torch.nn.Module) -> torch.Tensor:
    """``W_down`` ``[out, in]`` as vLLM computes with it: its CPU build packs linear weights
    for oneDNN and drops ``weight``; the layer applied to the identity gives it back (one
    product per output, exact in float32)."""
    width = int(module.input_size_per_partition)  # type: ignore[arg-type]
    with torch.no_grad():
        eye = torch.eye(width, dtype=torch.float32)
        out = module(eye)
        out = out[0] if isinstance(out, tuple) else out
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not getattr(module, "skip_bias_add", False):
            out = out - bias
    return out.T.contiguous()


class GuardExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.model_runner``)."""

    model_runner: Any

    def hguard_fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the weights vLLM computes with (TP = 1: every column on this
        rank), as JSON data. Packed (CPU) down projections get their weight back for the
        fingerprint and the capture's column norms; `hguard_install` frees it again."""
        model = self.model_runner.get_model()
        for layer in find_mlp_layers(model):
            weight = layer.module.weight
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
                restored = torch.nn.Parameter(_executed_weight(layer.module), requires_grad=False)
                layer.module.weight = restored
                setattr(layer.module, "_hguard_restored", True)  # noqa: B010
        return fingerprint_model(model).model_dump(mode="json")

    def hguard_install(
        self,
        probe_dir: str | None,
        probe_sha256: str | None,
        knowledge_layer: int | None,
        address: str,
    ) -> None:
        """Hook the capture into this worker's model (``probe_dir`` None: unguarded, the
        gates' inputs only) and publish to ``address``."""
        self.hguard_uninstall()
        scorer = pooled = None
        if probe_dir is not None:
            probe = load_probe(probe_dir, expected_sha256=probe_sha256)
            scorer = RiskScorer(probe)
            hidden = int(self.model_runner.get_model().config.hidden_size)
            gate = KnowledgeGate.from_probe(probe, hidden)
            pooled = gate if gate is not None and gate.pooled else None
        publisher = FramePublisher(address)
        capture = StepCapture(self.model_runner, scorer, knowledge_layer, publisher, pooled)
        capture.__enter__()
        self._hguard: tuple[StepCapture, FramePublisher] | None = (capture, publisher)
        self._hguard_drop_restored()

    def hguard_pause(self) -> None:
        self._hguard_capture().__exit__(None, None, None)

    def hguard_resume(self) -> None:
        self._hguard_capture().__enter__()

    def hguard_uninstall(self) -> None:
        installed = getattr(self, "_hguard", None)
        if installed is not None:
            capture, publisher = installed
            capture.__exit__(None, None, None)
            publisher.close()
            self._hguard = None

    def _hguard_capture(self) -> StepCapture:
        installed = getattr(self, "_hguard", None)
        if installed is None:
            raise RuntimeError("hguard_install has not run in this worker")
        return installed[0]

    def _hguard_drop_restored(self) -> None:
        for layer in find_mlp_layers(self.model_runner.get_model()):
            if getattr(layer.module, "_hguard_restored", False):
                layer.module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
                delattr(layer.module, "_hguard_restored")  # noqa: B043
