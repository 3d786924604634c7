"""MLP discovery and per-neuron CETT capture: the one measurement both halves share.

For an MLP whose output is ``h_t = W_down z_t (+ bias)``, neuron ``j`` of that layer
contributes ``z_{t,j} W_down[:, j]``; its CETT on token ``t`` is

    CETT_{l,j,t} = |z_{t,j}| * ||W_down[:, j]||_2 / ||h_t||_2

``z_t`` is the input of the down projection and ``h_t`` its output, so one forward hook
per layer reads both. Offline (``probes/``) captures every neuron; the runtime captures
only the neurons a probe uses. Both call the same code, so there is no train/serve skew.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from guard.errors import CaptureError, UnsupportedArchitectureError
from guard.hooks import Hook, ModelHooks

# Down projections by architecture. The layer index is the first group.
#   Llama, Mistral, Qwen2/3, Gemma 1/2/3, SmolLM2: model.layers.N.mlp.down_proj
#   GPT-2: transformer.h.N.mlp.c_proj (a Conv1D: weight is [in, out])
#   GPT-NeoX: gpt_neox.layers.N.mlp.dense_4h_to_h
#   OPT: model.decoder.layers.N.fc2
_DOWN_PROJ_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mlp.down_proj", re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")),
    ("mlp.c_proj", re.compile(r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$")),
    ("mlp.dense_4h_to_h", re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.dense_4h_to_h$")),
    ("fc2", re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.fc2$")),
)

# Linear layers with nn.Linear's [out, in] weight that are not nn.Linear: vLLM's down
# projection (tensor-parallel: each rank holds the columns of its own neurons).
_LINEAR_LIKE = frozenset({"RowParallelLinear"})

_EPS = 1e-12


@dataclass(frozen=True)
class MLPLayer:
    """One MLP's down projection: where it is and how its weight is laid out."""

    index: int
    name: str
    module: nn.Module
    transposed: bool  # True for GPT-2's Conv1D, whose weight is [in, out]

    @property
    def width(self) -> int:
        """Number of neurons (the down projection's input size)."""
        weight = self.weight_matrix()
        return int(weight.shape[1])

    def weight_matrix(self) -> torch.Tensor:
        """``W_down`` as ``[hidden, neurons]`` whatever the module's layout."""
        weight = self.module.weight
        if not isinstance(weight, torch.Tensor):
            raise UnsupportedArchitectureError(f"{self.name} has no weight tensor")
        return weight.T if self.transposed else weight

    @cached_property
    def column_norms(self) -> torch.Tensor:
        """``||W_down[:, j]||_2`` for every neuron ``j``: ``[neurons]``, float32.

        Computed once per `MLPLayer` (a guarded model keeps its layers, so a request does
        not pay for it); call `find_mlp_layers` again after editing the weights."""
        with torch.no_grad():
            return self.weight_matrix().float().norm(dim=0)


def find_mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """Every MLP down projection of ``model``, ordered by layer index.

    Raises UnsupportedArchitectureError naming the searched module paths when the
    model keeps its MLPs somewhere else.
    """
    for suffix, pattern in _DOWN_PROJ_PATTERNS:
        found: list[MLPLayer] = []
        for name, module in model.named_modules():
            match = pattern.search(name)
            if match is None:
                continue
            transposed = type(module).__name__ == "Conv1D"
            linear = isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_LIKE
            if not transposed and not linear:
                raise UnsupportedArchitectureError(
                    f"{name} is a {type(module).__name__}, expected nn.Linear or Conv1D"
                )
            found.append(MLPLayer(int(match.group(1)), name, module, transposed))
        if found:
            found.sort(key=lambda layer: layer.index)
            indices = [layer.index for layer in found]
            if indices != list(range(len(found))):
                raise UnsupportedArchitectureError(
                    f"MLP layers matched by '*.{suffix}' are not numbered 0..N-1: {indices}"
                )
            return found
    searched = ", ".join(f"'*.{suffix}'" for suffix, _ in _DOWN_PROJ_PATTERNS)
    raise UnsupportedArchitectureError(
        f"no MLP down projection found in {type(model).__name__}: searched module names "
        f"ending in {searched} (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-NeoX, OPT layouts)"
    )


NeuronSelection = Mapping[int, Sequence[int]]


@dataclass
class _LayerBuffer:
    """Per-capture storage for one layer: a chunk per forward pass, ``[batch, tokens, k]``;
    in last-position mode the newest pass's raw ``z`` (selected neurons) and ``h`` instead."""

    neurons: torch.Tensor | None  # selected neuron indices, None = all
    scale: torch.Tensor  # column norms of the selected neurons
    chunks: list[torch.Tensor] = field(default_factory=list)
    last: tuple[torch.Tensor, torch.Tensor] | None = None  # (z [batch, k], h [batch, D])


class _PassShape:
    """A forward pre-hook on the model that remembers the ``(batch, tokens)`` of each pass."""

    value: tuple[int, int] | None = None

    def __call__(
        self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor):
            self.value = (int(ids.shape[0]), int(ids.shape[1]))


class NeuronCapture(ModelHooks):
    """Record CETT of chosen MLP neurons during forward passes; hooks live only inside ``with``.

        with NeuronCapture(model, neurons={3: [17, 99]}) as capture:
            model(input_ids)
        cett = capture.cett(3)  # [batch, tokens, 2]

    ``neurons=None`` records every neuron of every layer; a mapping records only the given
    neurons of the given layers (the runtime's case). Each forward pass appends a chunk, so
    a generation with a KV cache yields ``[batch, prompt + steps, k]`` after concatenation,
    aligned with the input ids. Buffers belong to this capture object only; hooks are
    removed on exit even when the body raises, and exiting twice is harmless.

    ``last_position=True`` is the decode loop's mode: each pass keeps only its last
    position, and `pop_last` turns all layers into one ``[batch, K]`` tensor with a handful
    of fused operations (the per-token cost of guarding is mostly operator dispatch).
    """

    def __init__(
        self,
        model: nn.Module,
        neurons: NeuronSelection | None = None,
        *,
        layers: Sequence[MLPLayer] | None = None,
        dtype: torch.dtype = torch.float32,
        last_position: bool = False,
    ) -> None:
        self._model = model
        self._dtype = dtype
        self._last_position = last_position
        all_layers = list(layers) if layers is not None else find_mlp_layers(model)
        by_index = {layer.index: layer for layer in all_layers}
        wanted = sorted(by_index) if neurons is None else sorted(neurons)
        # Resolve and validate everything before registering a single hook.
        self._layers: dict[int, MLPLayer] = {}
        self._buffers: dict[int, _LayerBuffer] = {}
        # The hooks hold the buffers and the pass shape, never the capture itself: a
        # capture that refers to itself through its hooks would be a reference cycle, and
        # its buffers (every neuron of a batch: hundreds of MB offline) would wait for the
        # cyclic garbage collector instead of going with the last reference.
        self._batch_shape = _PassShape()
        for index in wanted:
            if index not in by_index:
                raise CaptureError(
                    f"layer {index} does not exist: the model has MLP layers 0..{len(by_index) - 1}"
                )
            layer = by_index[index]
            norms = layer.column_norms
            selected: torch.Tensor | None = None
            if neurons is not None:
                selected = torch.as_tensor(list(neurons[index]), dtype=torch.long)
                if selected.numel() == 0:
                    raise CaptureError(f"layer {index}: empty neuron list")
                if int(selected.min()) < 0 or int(selected.max()) >= norms.numel():
                    raise CaptureError(
                        f"layer {index}: neuron indices must lie in 0..{norms.numel() - 1}"
                    )
                selected = selected.to(norms.device)
                norms = norms[selected]
            self._layers[index] = layer
            self._buffers[index] = _LayerBuffer(selected, norms.to(dtype))
        # OPT flattens tokens to [batch * tokens, ...] inside its MLP: a pre-hook on the
        # model remembers the batch shape of each pass to restore it.
        hooks = [Hook(model, self._batch_shape, pre=True, with_kwargs=True)]
        hooks += [
            Hook(layer.module, self._make_hook(self._buffers[i]))
            for i, layer in self._layers.items()
        ]
        super().__init__(model, "neuron", hooks)
        # Last-position mode: every selected neuron's column norm, and its layer's slot.
        buffers = list(self._buffers.values())
        self._scale_all = torch.cat([b.scale for b in buffers]) if buffers else torch.zeros(0)
        self._slot_of_neuron = torch.repeat_interleave(
            torch.arange(len(buffers)), torch.as_tensor([b.scale.numel() for b in buffers])
        ).to(self._scale_all.device)

    @property
    def layer_indices(self) -> list[int]:
        """The captured layers, ascending."""
        return list(self._buffers)

    def _make_hook(self, buffer: _LayerBuffer):  # type: ignore[no-untyped-def]
        dtype, last_position, shape = self._dtype, self._last_position, self._batch_shape

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            z, h = inputs[0], output
            if z.dim() == 2 and shape.value is not None:
                z = z.reshape(*shape.value, z.shape[-1])
                h = h.reshape(*shape.value, h.shape[-1])
            if last_position:
                z_last = z[:, -1]
                if buffer.neurons is not None:
                    z_last = z_last.index_select(-1, buffer.neurons)
                buffer.last = (z_last, h[:, -1])
            else:
                buffer.chunks.append(compute_cett(z, h, buffer.scale, buffer.neurons, dtype))

        return hook

    def cett(self, layer: int) -> torch.Tensor:
        """CETT of ``layer`` over all recorded passes: ``[batch, tokens, k]``."""
        buffer = self._buffers.get(layer)
        if buffer is None:
            raise CaptureError(f"layer {layer} was not captured; captured: {self.layer_indices}")
        if not buffer.chunks:
            raise CaptureError("no forward pass was recorded inside the capture")
        if len(buffer.chunks) > 1:
            buffer.chunks[:] = [torch.cat(buffer.chunks, dim=1)]
        return buffer.chunks[0]

    def items(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(layer, cett)`` for every captured layer, ascending."""
        for index in self._buffers:
            yield index, self.cett(index)

    def pop_last(self) -> torch.Tensor:
        """CETT at the last position of the newest pass, every captured neuron in layer
        order: ``[batch, K]``. Last-position mode only; clears what it returns."""
        if not self._last_position:
            raise CaptureError("pop_last needs NeuronCapture(..., last_position=True)")
        parts = [buffer.last for buffer in self._buffers.values()]
        if not parts or any(part is None for part in parts):
            raise CaptureError("no forward pass was recorded since the last pop")
        z = torch.cat([part[0] for part in parts if part is not None], dim=-1).to(self._dtype)
        h = torch.stack([part[1] for part in parts if part is not None], dim=1)  # [batch, L, D]
        for buffer in self._buffers.values():
            buffer.last = None
        norms = output_norms(h, self._dtype).squeeze(-1)  # [batch, L]
        return cett_from_parts(z, norms.index_select(-1, self._slot_of_neuron), self._scale_all)


def compute_cett(
    z: torch.Tensor,
    h: torch.Tensor,
    column_norms: torch.Tensor,
    neurons: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """CETT from the down projection's input ``z`` ``[..., I]`` and output ``h`` ``[..., D]``.

    ``column_norms`` holds ``||W_down[:, j]||`` of the neurons kept (all, or ``neurons``).
    Returns ``[..., k]`` in ``dtype``, detached.
    """
    with torch.no_grad():
        z_sel = z if neurons is None else z.index_select(-1, neurons)
        return cett_from_parts(z_sel.to(dtype), output_norms(h, dtype), column_norms)


def output_norms(
    h: torch.Tensor, dtype: torch.dtype = torch.float32, *, floor: bool = True
) -> torch.Tensor:
    """``||h_t||_2`` over the last axis, kept as a size-1 axis, never below a tiny epsilon
    (``floor=False``: not yet; the caller applies `floor_norms` once to many of them)."""
    norms = torch.linalg.vector_norm(h.to(dtype), dim=-1, keepdim=True)
    return floor_norms(norms) if floor else norms


def floor_norms(norms: torch.Tensor) -> torch.Tensor:
    """Norms never below the tiny epsilon that keeps CETT finite for an all-zero output."""
    return norms.clamp_min(_EPS)


def cett_from_parts(
    z_sel: torch.Tensor, h_norms: torch.Tensor, column_norms: torch.Tensor
) -> torch.Tensor:
    """The CETT formula on its parts: ``|z_j| * ||W_down[:, j]|| / ||h||`` (broadcasting)."""
    return (z_sel.abs() * column_norms) / h_norms
