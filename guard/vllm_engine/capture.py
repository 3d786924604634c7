"""The worker side of the vLLM engine: CETT and logit statistics inside vLLM's forward.

vLLM runs one flattened batch per step: every scheduled request's tokens back to back
(prefill chunks and decodes mixed), request ``i`` owning rows
``query_start_loc[i]:query_start_loc[i + 1]`` in the order of the model runner's input
batch (``input_batch.req_ids``). `StepCapture` hooks (through `guard.hooks.ModelHooks`):

- the model's forward pre-hook: the step's layout (request order, ``query_start_loc``
  from the attention metadata, ``positions``) and which rows matter: *response rows*
  (position >= the request's prompt length: a generated token being fed, or a
  teacher-forced answer token) and each request's last prompt row (the gates' input);
- each probe layer's down projection (`RowParallelLinear`): ``z`` of the probe's neurons
  and ``||h||`` on the response rows only (no full-width copy leaves the hook);
- the knowledge gate's decoder layer: the residual stream after it at the last prompt row
  (vLLM's decoder layers return ``(hidden, residual)`` and leave the residual add to the
  next layer's norm, so the stream is their sum: what transformers' block returns); for a
  max-pooled gate, its logit at every prompt row, kept per request across prefill chunks,
  the max sent with the last prompt row (vLLM's prefix cache is off for such a gate:
  `build_llm`);
- the model's forward hook: the final hidden state at the last prompt row, and for
  teacher-forced requests the full-vocabulary logits at the rows that predict answer tokens;
- the sampler's pre-hook (the raw logits it samples from, one row per request: their
  log-probs and entropy, temperature 1, before any processing) and its forward hook (the
  sampled ids: their log-probs; `guard.scoring.logit_statistics`).

A step in which every request only feeds its last kept token (its sample is dropped) runs
the decoder layers up to the last one read and no LM head (`TailSkip`).

Which requests to measure, and their prompt lengths, the capture reads from vLLM's own
request state (``sampling_params.extra_args``, `measure_args`): nothing is registered with
the worker. At the end of a step (the sampler's hook) the response rows' CETT becomes
`RiskScorer.measure` rows, and the step's values go out as one frame of plain data
(`guard.vllm_engine.channel`: the worker extension publishes it to the API process). One
host copy per step. With TP > 1 each rank would hold its own neurons' ``z`` (row-parallel
input) and the all-reduced ``h``: docs/ARCHITECTURE.md.

Needs eager execution: CUDA graphs replay without running Python hooks, and torch.compile
would trace these host reads into graph breaks (`guard.vllm_engine.engine` forces
``enforce_eager``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from guard.errors import CaptureError
from guard.hooks import Hook, ModelHooks
from guard.knowledge import KnowledgeGate, decoder_block
from guard.neurons import cett_from_parts, find_mlp_layers, floor_norms, output_norms
from guard.scoring import RiskScorer, log_probs_and_entropy, logit_statistics
from guard.vllm_engine.channel import Frame

EXTRA_ARGS_KEY = "hguard"  # SamplingParams.extra_args[EXTRA_ARGS_KEY]: what to measure
# Requests whose prompt is part-way through prefill, each with its pooled gate's running
# max; the oldest are dropped beyond this (requests aborted mid-prefill never finish it).
MAX_POOLING_REQUESTS = 4096


def measure_args(
    prompt_len: int, *, forced: bool = False, drops_last: bool = False
) -> dict[str, Any]:
    """The ``extra_args`` that ask the capture to measure a request: its prompt length
    (rows at or after it are response rows); for teacher forcing, that the prompt's tail is
    the answer to score; ``drops_last``: the engine drops the request's last sample (it is
    asked for only so that the last kept token is fed and measured: `TailSkip`). Requests
    without them are not measured."""
    return {EXTRA_ARGS_KEY: {"prompt_len": prompt_len, "forced": forced, "drops_last": drops_last}}


@dataclass(frozen=True)
class Tracked:
    """A request the capture measures: its prompt length, for teacher forcing the whole
    sequence (prompt + answer), whose answer tokens are scored from the prompt pass, and
    the response index of a last sample the engine drops (None: every sample is kept)."""

    prompt_len: int
    forced_ids: list[int] | None = None
    dropped_index: int | None = None


@dataclass
class _Layout:
    """Which rows of this step's flat batch matter, and whose they are."""

    req_ids: list[str]
    sampled_index: dict[str, int]  # request -> response index of the token sampled now
    response_rows: torch.Tensor  # [N] row indices into the flat batch
    all_response: bool  # every row of the step is a response row (a decode-only step)
    response_of: list[tuple[str, int]]  # per response row: (request, response index)
    prompt_rows: dict[str, int]  # request -> row of its last prompt token
    forced_rows: dict[str, tuple[torch.Tensor, list[int], list[int]]]  # rows, indices, next ids
    tail: bool = False  # every request feeds its last kept token, samples only a dropped one
    # per request with prompt rows in this step: (first row, end row, first position)
    prompt_spans: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class TailSkip:
    """The last step of a generation computes less. vLLM is asked for one token more than
    the answer keeps (`measure_args`' ``drops_last``) so that the last kept token is fed and
    measured; that step's sample is dropped. When every request of a step is on that step,
    it needs the decoder layers up to the last one the guard reads and no logits: the stack
    stops there (the model's ``end_layer``, vLLM's own pipeline-parallel split, restored
    after the forward) and ``compute_logits`` returns zeros for the dropped samples (on
    SmolLM2 8 of 30 layers and the 49k-row LM head: ~40% of that step).

    Not when a fed token fills its KV block: vLLM caches full blocks for prefix reuse, and
    the skipped layers would leave that block without their keys and values. A model
    without a plain ``start_layer``/``end_layer`` stack (or split over ranks) skips nothing.
    """

    def __init__(self, model: Any, stack: Any, end_layer: int) -> None:
        self.model, self.stack, self.end_layer = model, stack, end_layer
        self.full_end: int = stack.end_layer
        self.vocab: int | None = None  # logits width, from the last full step's sampler
        self.block_sizes: tuple[int, ...] = ()

    @classmethod
    def of(cls, runner: Any, model: Any, last_layer: int) -> TailSkip | None:
        """The skip for ``model`` when the guard reads nothing after ``last_layer``."""
        name = find_mlp_layers(model)[last_layer].name.split(f".{last_layer}.")[0]
        owner, _, attribute = name.rpartition(".")
        stack = model.get_submodule(owner) if owner else model
        layers = getattr(stack, attribute, None)
        start, end = getattr(stack, "start_layer", None), getattr(stack, "end_layer", None)
        if not isinstance(layers, nn.ModuleList) or (start, end) != (0, len(layers)):
            return None
        if not callable(getattr(model, "compute_logits", None)):
            return None
        skip = cls(model, stack, last_layer + 1)
        skip.block_sizes = _block_sizes(runner)
        return skip

    def allows(self, fed_positions: list[int]) -> bool:
        """Whether a step feeding tokens at these positions may skip: the logits width is
        known and no fed token fills a KV block."""
        return self.vocab is not None and not any(
            (pos + 1) % size == 0 for pos in fed_positions for size in self.block_sizes
        )

    def begin(self) -> None:
        self.stack.end_layer = self.end_layer
        self.model.compute_logits = self._zeros

    def end_forward(self) -> None:
        self.stack.end_layer = self.full_end

    def reset(self) -> None:
        """Undo whatever a step left (a failed step may not have reached its logits)."""
        self.end_forward()
        self.model.__dict__.pop("compute_logits", None)

    def _zeros(self, hidden: torch.Tensor) -> torch.Tensor:
        del self.model.compute_logits  # one call: vLLM's own method is back
        if self.vocab is None:
            raise CaptureError("a tail step before any full step gave the logits' width")
        return hidden.new_zeros(hidden.shape[0], self.vocab)


def _block_sizes(runner: Any) -> tuple[int, ...]:
    """The KV cache's block sizes (one per cache group), else the configured one."""
    groups = getattr(getattr(runner, "kv_cache_config", None), "kv_cache_groups", None) or []
    sizes = {int(group.kv_cache_spec.block_size) for group in groups}
    return tuple(sorted(sizes)) or (int(runner.cache_config.block_size),)


class StepCapture(ModelHooks):
    """Hooks on one vLLM model runner; ``with`` registers them, exit removes them.
    ``knowledge_layer``: the knowledge gate's decoder layer (None: no gate). Each step's
    values go to ``publish`` as one frame of plain data (msgpack-able, no tensors):

        {"seconds": hook seconds, "tail": whether the step was a `TailSkip` one,
         "requests": {req_id: {"sampled": [index, token id, log-prob, entropy],
                               "measured": [[index, *measure row], ...],
                               "hidden": [...], "residual": [...],   # at the last prompt row
                               "forced": [[index, log-prob, entropy], ...]}}}

    ``index`` is a response index (0: the first generated token); keys appear only when the
    step has them (a partial prefill chunk samples nothing vLLM keeps: no ``sampled``)."""

    def __init__(
        self,
        runner: Any,
        scorer: RiskScorer | None,
        knowledge_layer: int | None,
        publish: Callable[[Frame], None],
        pooled: KnowledgeGate | None = None,
    ) -> None:
        self.runner = runner
        self._pooled = pooled  # a max-pooled knowledge gate (on ``knowledge_layer``)
        self._gate_max: OrderedDict[str, float] = OrderedDict()  # its running max per request
        self.model: Any = runner.get_model()  # vLLM's model: compute_logits, config
        self.scorer = scorer
        self.publish = publish
        self._records: dict[str, dict[str, Any]] = {}
        self._layout: _Layout | None = None
        self._parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # log-probs, entropy
        self._seconds = 0.0  # guard work inside this step's hooks
        hooks = [
            Hook(self.model, self._on_model_input, pre=True, with_kwargs=True),
            Hook(self.model, self._on_model_output, with_kwargs=True),
            Hook(runner.sampler, self._on_sampler_input, pre=True, with_kwargs=True),
            Hook(runner.sampler, self._on_sampler_output, with_kwargs=True),
        ]
        self._neurons: dict[int, torch.Tensor] = {}
        scale: list[torch.Tensor] = []
        if scorer is not None:
            layers = {layer.index: layer for layer in find_mlp_layers(self.model)}
            for index, neurons in scorer.neuron_selection().items():
                if index not in layers:
                    raise CaptureError(f"the vLLM model has no MLP layer {index}")
                norms = layers[index].column_norms
                selected = torch.as_tensor(neurons, dtype=torch.long, device=norms.device)
                self._neurons[index] = selected
                scale.append(norms[selected].float())
                hooks.append(Hook(layers[index].module, self._make_layer_hook(index)))
        if knowledge_layer is not None:
            block = decoder_block(self.model, knowledge_layer)
            hooks.append(Hook(block, self._on_knowledge_block))
        self._scale = torch.cat(scale) if scale else torch.zeros(0)
        read = [*self._neurons, *([] if knowledge_layer is None else [knowledge_layer])]
        self._tail = TailSkip.of(runner, self.model, max(read)) if read else None
        widths = [len(n) for n in self._neurons.values()]
        self._slot = torch.repeat_interleave(torch.arange(len(widths)), torch.as_tensor(widths))
        super().__init__(self.model, "vllm step", hooks)

    def _remove(self) -> None:
        """Remove the hooks, and give the model back whole (a step that failed after
        `TailSkip.begin` would leave it shortened)."""
        if self._tail is not None:
            self._tail.reset()
        super()._remove()

    def _record(self, req_id: str) -> dict[str, Any]:
        return self._records.setdefault(req_id, {})

    def _tracked(self, req_id: str) -> Tracked | None:
        """What to measure for ``req_id``, from vLLM's own request state: the
        ``extra_args`` of `measure_args` (None: not ours, not measured)."""
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
        if state is None or not isinstance(extra, dict):
            return None
        forced = list(state.prompt_token_ids) if extra.get("forced") else None
        max_tokens = getattr(params, "max_tokens", None)
        dropped = max_tokens - 1 if extra.get("drops_last") and max_tokens else None
        return Tracked(int(extra["prompt_len"]), forced, dropped)

    # --- hooks (the worker's thread, inside vLLM's step) ---
    def _on_model_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
            raise CaptureError("vLLM called the model without flat 1-D positions")
        batch = self.runner.input_batch
        req_ids = list(batch.req_ids[: batch.num_reqs])
        starts = _query_start_loc(self.runner, len(req_ids))
        if starts[-1] > positions.numel():
            raise CaptureError(f"query_start_loc {starts} overruns {positions.numel()} tokens")
        if self._tail is not None:
            self._tail.reset()
        self._layout = self._plan(req_ids, starts, positions.tolist())
        self._parts = {}
        if self._layout.tail and self._tail is not None:
            self._tail.begin()
        self._seconds += time.perf_counter() - started

    def _plan(self, req_ids: list[str], starts: list[int], positions: list[int]) -> _Layout:
        rows: list[int] = []
        sampled_index: dict[str, int] = {}
        response_of: list[tuple[str, int]] = []
        prompt_rows: dict[str, int] = {}
        forced_rows: dict[str, tuple[torch.Tensor, list[int], list[int]]] = {}
        prompt_spans: dict[str, tuple[int, int, int]] = {}
        dropping = 0  # requests whose sample this step is one the engine drops
        for i, req_id in enumerate(req_ids):
            info = self._tracked(req_id)
            if info is None or starts[i] == starts[i + 1]:
                continue
            plen = info.prompt_len
            if positions[starts[i + 1] - 1] >= plen - 1:  # not a partial prefill chunk
                sampled_index[req_id] = positions[starts[i + 1] - 1] - plen + 1
                dropping += sampled_index[req_id] == info.dropped_index
            f_rows, f_index, f_next = [], [], []
            for row in range(starts[i], starts[i + 1]):
                pos = positions[row]
                if pos >= plen:
                    rows.append(row)
                    response_of.append((req_id, pos - plen))
                elif pos == plen - 1:
                    prompt_rows[req_id] = row
                if info.forced_ids is not None and plen - 1 <= pos < len(info.forced_ids) - 1:
                    f_rows.append(row)
                    f_index.append(pos + 1 - plen)
                    f_next.append(info.forced_ids[pos + 1])
            if f_rows:
                forced_rows[req_id] = (torch.as_tensor(f_rows), f_index, f_next)
            if self._pooled is not None and positions[starts[i]] < plen:  # prompt rows first
                end = starts[i] + min(starts[i + 1] - starts[i], plen - positions[starts[i]])
                prompt_spans[req_id] = (starts[i], end, positions[starts[i]])
        all_response = len(rows) == len(positions)
        tail = (
            all_response
            and dropping == len(req_ids)
            and self._tail is not None
            and self._tail.allows(positions)
        )
        return _Layout(req_ids, sampled_index, torch.as_tensor(rows, dtype=torch.long),
                       all_response, response_of, prompt_rows, forced_rows, tail,
                       prompt_spans)  # fmt: skip

    def _make_layer_hook(self, index: int):  # type: ignore[no-untyped-def]
        neurons = self._neurons[index]

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            layout = self._layout
            if layout is None or layout.response_rows.numel() == 0:
                return
            started = time.perf_counter()
            x, h = inputs[0], output[0] if isinstance(output, tuple) else output
            if not layout.all_response:  # a decode-only step needs no row selection
                rows = layout.response_rows.to(h.device)
                x, h = x.index_select(0, rows), h.index_select(0, rows)
            self._parts[index] = (x.index_select(1, neurons), output_norms(h, floor=False))
            self._seconds += time.perf_counter() - started

        return hook

    def _on_knowledge_block(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        layout = self._layout
        if layout is None or not (layout.prompt_spans if self._pooled else layout.prompt_rows):
            return
        parts = [output] if isinstance(output, torch.Tensor) else list(output)
        if not 1 <= len(parts) <= 2 or not all(isinstance(p, torch.Tensor) for p in parts):
            raise CaptureError(
                f"{type(module).__name__} returned {type(output).__name__}, not the hidden "
                "state (and residual) the knowledge gate reads"
            )
        with torch.no_grad():
            if self._pooled is not None:
                self._pool_prompt_rows(layout, parts, self._pooled)
                return
            rows = torch.as_tensor(list(layout.prompt_rows.values()), device=parts[0].device)
            stream = _residual_stream(parts, rows)
            for req_id, state in zip(layout.prompt_rows, stream.tolist(), strict=True):
                self._record(req_id)["residual"] = state

    def _pool_prompt_rows(
        self, layout: _Layout, parts: list[torch.Tensor], gate: KnowledgeGate
    ) -> None:
        """The pooled gate's logit at this step's prompt rows, into each request's running
        max; a request whose last prompt row this is gets the max in its record."""
        spans = layout.prompt_spans
        rows = torch.cat([torch.arange(a, b) for a, b, _ in spans.values()]).to(parts[0].device)
        logits = gate.logits(_residual_stream(parts, rows)).tolist()
        offset = 0
        for req_id, (first, end, position) in spans.items():
            best = max(logits[offset : offset + end - first])
            offset += end - first
            if position > 0:  # a later chunk: the earlier ones' max must be here
                if req_id not in self._gate_max:
                    raise CaptureError(
                        f"{req_id}'s prompt starts at position {position} in this step: "
                        "the pooled knowledge gate missed its first tokens (prefix cache?)"
                    )
                best = max(best, self._gate_max[req_id])
            if req_id in layout.prompt_rows:
                self._gate_max.pop(req_id, None)
                self._record(req_id)["prompt_logit"] = best
                continue
            self._gate_max[req_id] = best
            self._gate_max.move_to_end(req_id)
            while len(self._gate_max) > MAX_POOLING_REQUESTS:  # requests gone mid-prefill
                self._gate_max.popitem(last=False)

    def _on_model_output(  # type: ignore[no-untyped-def]
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ):
        layout = self._layout
        if layout is not None and layout.tail and self._tail is not None:
            self._tail.end_forward()
        if layout is None or not isinstance(output, torch.Tensor):
            return
        with torch.no_grad():
            for req_id, row in layout.prompt_rows.items():
                self._record(req_id)["hidden"] = output[row].float().tolist()
            for req_id, (rows, indices, next_ids) in layout.forced_rows.items():
                logits = self.model.compute_logits(output.index_select(0, rows.to(output.device)))
                logprob, entropy = logit_statistics(logits, torch.as_tensor(next_ids))
                stats = zip(indices, logprob.tolist(), entropy.tolist(), strict=True)
                self._record(req_id).setdefault("forced", []).extend(
                    [i, lp, e] for i, lp, e in stats
                )

    def _on_sampler_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
        logits = kwargs.get("logits", args[0] if args else None)
        layout = self._layout
        self._stats = None
        if layout is None or layout.tail or not isinstance(logits, torch.Tensor):
            return  # a tail step's logits are `TailSkip`'s zeros: nothing to measure
        started = time.perf_counter()
        if self._tail is not None:
            self._tail.vocab = logits.shape[-1]
        # before the sampler, which may modify its float32 input in place (temperature,
        # penalties): the log-probs are a new tensor, so the logits need no copy
        self._stats = log_probs_and_entropy(logits)
        self._seconds += time.perf_counter() - started

    def _on_sampler_output(  # type: ignore[no-untyped-def]
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ):
        layout, stats, self._stats, self._layout = self._layout, self._stats, None, None
        if layout is None or (stats is None and not layout.tail):
            return
        started = time.perf_counter()
        with torch.no_grad():
            sampled = output.sampled_token_ids[:, 0].long()
            if stats is None:  # a tail step: its samples are dropped unread
                logprob = entropy = torch.full(sampled.shape, float("nan"))
            else:
                logp, entropy = stats
                logprob = logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
            values = torch.stack([sampled.double(), logprob.double(), entropy.double()], 1)
            measured = self._measure(layout)
            rows, measured_rows = values.tolist(), measured.tolist() if measured is not None else []
        for req_id, (token, lp, ent) in zip(layout.req_ids, rows, strict=False):
            index = layout.sampled_index.get(req_id)
            if index is not None:
                self._record(req_id)["sampled"] = [index, int(token), lp, ent]
        for (req_id, index), row in zip(layout.response_of, measured_rows, strict=True):
            self._record(req_id).setdefault("measured", []).append([index, *row])
        records, self._records = self._records, {}
        seconds, self._seconds = self._seconds + time.perf_counter() - started, 0.0
        self.publish({"seconds": seconds, "tail": layout.tail, "requests": records})

    def _measure(self, layout: _Layout) -> torch.Tensor | None:
        """`RiskScorer.measure` of this step's response rows ``[N, 1 + layers]``."""
        scorer = self.scorer
        if scorer is None or layout.response_rows.numel() == 0:
            return None
        if set(self._parts) != set(self._neurons):
            raise CaptureError(f"probe layers {sorted(self._neurons)} did not all run this step")
        parts = [self._parts[index] for index in self._neurons]
        z = torch.cat([part[0] for part in parts], dim=-1).float()
        norms = floor_norms(torch.cat([part[1] for part in parts], dim=-1))  # [N, layers]
        self._parts = {}
        cett = cett_from_parts(z, norms.index_select(-1, self._slot), self._scale)
        return scorer.measure(cett).double()


def _residual_stream(parts: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The residual stream at ``rows`` from a decoder layer's outputs: the hidden state plus
    the residual vLLM has not added yet (when the layer returns it) ``[rows, hidden]``."""
    stream = parts[0].index_select(0, rows).float()
    for part in parts[1:]:
        stream = stream + part.index_select(0, rows).float()
    return stream


def _query_start_loc(runner: Any, num_reqs: int) -> list[int]:
    """Request boundaries of the step: the attention metadata's ``query_start_loc`` (the
    forward context), else the runner's own buffer it was built from."""
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batched: one dict per ubatch (not used here)
        metadata = metadata[0] if metadata else None
    if isinstance(metadata, dict):
        for value in metadata.values():
            loc = getattr(value, "query_start_loc", None)
            if isinstance(loc, torch.Tensor):
                return [int(v) for v in loc[: num_reqs + 1].tolist()]
    return [int(v) for v in runner.query_start_loc.np[: num_reqs + 1].tolist()]
