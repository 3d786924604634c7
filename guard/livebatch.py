"""The running batch: requests join between decode steps, rows leave at once.

`LiveBatch` owns the rows decoding together and their model state (`guard.kvbatch`: one
`DynamicCache`, the attention mask, each row's position). Each `LiveBatch.step`

1. feeds waiting prompts into their own KV cache (prefill), then lets them join:
   - at most ``prefill_tokens`` prompt tokens (rows x padded width) per step while rows
     are decoding; an idle batch stalls nobody, so it prefills every waiting group in one
     step (each group still at most ``prefill_tokens``: the burst's first tokens come one
     decode pass after the last prompt, not one per group);
   - requests are grouped oldest first; a later one joins a group while the group stays
     within the cap and its padding within `MAX_PADDING` (prompts of mixed lengths cost
     their own length, not the longest one's);
   - a prompt longer than the cap is fed ``prefill_tokens`` at a time, one chunk per step
     (chunked prefill). Chunked rather than only bounded: a bound alone must still let a
     prompt longer than the bound through in one pass, stalling every running row for its
     whole prefill; in chunks, it delays each decode step by one chunk at most;
   - a prompt that begins like an earlier one (a chat template's system prompt) starts
     from that prompt's keys and values (`guard.kvbatch.Prefix`) and feeds only the rest;
     the kept prefix is the first prompt of the last group that found little in it;
   - the pass that completes a group gives its first sampled tokens and, inside a
     `FinalHiddenCapture` and a `ResidualCapture`, the scope and the knowledge gates'
     inputs; a row whose prompt risk alone makes the policy abstain ends there, unanswered;
     the others merge into the running batch (left-padded with masked zeros along the
     sequence axis);
2. feeds every running row its pending token in one pass under one `NeuronCapture` (the
   probe's neurons, last-position mode), with one device-to-host copy ``[rows, 4 +
   layers]``: next ids, their log-prob and entropy, the fed tokens' `RiskScorer.measure`;
   each `DecodeRow` scores and decides (`guard.decoding`);
3. drops the rows that finished, aborted or were cancelled from the batch and the cache.

When every running row ends with the token being fed, that last pass skips the LM head and
stops after the last probed layer. Hooks are registered per forward pass, so other model
work (teacher-forced scoring) runs between steps. A row's numbers do not depend on the
other rows (padding is masked): tested to 1e-4 alone, in a fixed batch and joining or
leaving mid-flight, on every supported MLP layout.

The server's worker keeps one `LiveBatch` for its lifetime (`guard.batching`);
`decode_batch` runs a fixed batch (all prompts in one pass, nothing kept) to its end.

    batch = LiveBatch(engine, prefill_tokens=512)
    batch.add([GenerationRequest(prompt_ids, SamplingParams(max_tokens=32), sink)])
    while batch:
        batch.step()
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# The row's state and its scoring belong to guard.decoding; the batch drives the rows.
from guard.decoding import DecodeEngine, DecodeRow, GenerationRequest, StepInfo, _make_row
from guard.errors import InvalidRequestError
from guard.knowledge import risks_of
from guard.kvbatch import KVBatch, Prefix, PromptBatch, merge
from guard.neurons import NeuronCapture
from guard.sampling import sample_next
from guard.scope import FinalHiddenCapture
from guard.scoring import logit_statistics

# Prompt tokens (rows x padded width) fed per step while other rows decode.
DEFAULT_PREFILL_TOKENS = 512
# Rows prefilled together waste at most this share of the pass on padding.
MAX_PADDING = 0.25
# A group whose rows took fewer tokens than this from the kept prefix replaces it.
MIN_SHARED_PREFIX = 8


def decode_batch(
    engine: DecodeEngine,
    requests: Sequence[GenerationRequest],
    on_step: Callable[[StepInfo], None] | None = None,
) -> None:
    """Decode ``requests`` as one fixed batch (one prompt pass for all, then steps until the
    last row leaves); every request's sink gets its tokens and one result."""
    batch = LiveBatch(engine, on_step, prefill_tokens=None, reuse_prefix=False)
    batch.add(requests)
    while batch:
        batch.step()


@dataclass
class _Joining:
    """Requests whose prompts are being prefilled together (`PromptBatch`); ``shared``: the
    most prompt tokens a row took from the prefix."""

    rows: list[DecodeRow]
    prompts: PromptBatch
    shared: int


class LiveBatch:
    """The running batch of one model (see the module docstring); calls must be serialised.

    batch = LiveBatch(engine)
    batch.add(requests)      # they join at the coming steps
    while batch:
        batch.step()
    """

    def __init__(
        self,
        engine: DecodeEngine,
        on_step: Callable[[StepInfo], None] | None = None,
        *,
        prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        reuse_prefix: bool = True,
    ) -> None:
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1 (or None), not {prefill_tokens}")
        self.engine = engine
        self.model = engine.model
        self.device = next(self.model.parameters()).device
        self.on_step = on_step
        self.prefill_tokens = prefill_tokens
        self.reuse_prefix = reuse_prefix
        self.prefix: Prefix | None = None  # an earlier prompt's keys and values
        self.capture: NeuronCapture | None = None
        if engine.scorer is not None:
            self.capture = NeuronCapture(
                self.model,
                engine.scorer.neuron_selection(),
                layers=engine.mlp_layers,
                last_position=True,
            )
        self.rows: list[DecodeRow] = []  # running: each has a sampled token to feed next
        self.kv: KVBatch | None = None  # the running rows' model state, in their order
        self.joining: _Joining | None = None
        self.waiting: deque[DecodeRow] = deque()

    def __len__(self) -> int:
        """Requests in the batch: running, being prefilled, waiting to be."""
        joining = len(self.joining.rows) if self.joining is not None else 0
        return len(self.rows) + joining + len(self.waiting)

    def add(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue requests to join at the coming steps."""
        for request in requests:
            if not request.prompt_ids:
                raise InvalidRequestError("the prompt is empty: give at least one token")
        self.waiting.extend(_make_row(self.engine, r, self.device) for r in requests)

    def step(self) -> None:
        """Feed some waiting prompts (they join once complete), then decode one token for
        every running row."""
        with torch.inference_mode():
            joined, seconds = self._join()
            fed, scored = len(self.rows), 0
            if self.rows:
                scored, decode_seconds = self._decode()
                seconds += decode_seconds
        if self.on_step is not None:
            self.on_step(StepInfo(fed, scored, seconds, joined))

    def clear(self) -> list[GenerationRequest]:
        """Drop every row and the cache (after a failed step); the unfinished requests."""
        rows = [*self.rows, *(self.joining.rows if self.joining else []), *self.waiting]
        self.rows, self.kv, self.joining = [], None, None
        self.waiting.clear()
        return [row.request for row in rows if not row.done]

    def _join(self) -> tuple[int, float]:
        """Prefill waiting prompts: at most ``prefill_tokens`` per step while rows decode;
        an idle batch stalls nobody, so then every group that fits in one pass (each at
        most ``prefill_tokens``). A longer prompt gets one chunk per step. Groups whose
        prompts are complete join. Returns the rows that joined and the guard seconds."""
        budget = self.prefill_tokens if self.rows else None  # None: no limit this step
        joined, seconds = 0, 0.0
        group = self.joining
        while budget is None or budget > 0:
            if group is None:
                fresh = self.joining is None and budget in (None, self.prefill_tokens)
                group = self._next_group(self._cap(budget), may_chunk=fresh)
                if group is None:
                    break
            if _drop_cancelled(group):
                budget, logits = self._feed(group, budget)
                if logits is None:  # a long prompt: more chunks at the next steps
                    self.joining = group
                else:
                    self.joining = None if group is self.joining else self.joining
                    seconds += self._admit(group, logits)
                    joined += len(group.rows)
            elif group is self.joining:
                self.joining = None
            group = None
        return joined, seconds

    def _cap(self, budget: int | None) -> int | None:
        """The most prompt tokens one group may feed now (None: no limit at all)."""
        limit = self.prefill_tokens
        return limit if budget is None or limit is None else min(budget, limit)

    def _feed(self, group: _Joining, budget: int | None) -> tuple[int | None, torch.Tensor | None]:
        """One pass of the group's prompts within the cap; the budget left, and the logits
        once the prompts are complete."""
        cap, prompts, before = self._cap(budget), group.prompts, group.prompts.fed
        logits = self._prefill(group, None if cap is None else max(1, cap // prompts.rows))
        if budget is not None:
            budget -= prompts.rows * (prompts.fed - before)
        return budget, logits

    def _next_group(self, cap: int | None, *, may_chunk: bool) -> _Joining | None:
        """Waiting requests to prefill together: the oldest, then later ones (in order)
        while rows x longest part to feed stays within ``cap`` and padding within
        `MAX_PADDING` of that. An oldest longer than ``cap`` alone, to be fed in chunks,
        if ``may_chunk``. ``cap=None``: everything waiting, in one pass."""
        if not self.waiting:
            return None
        prefix = self.prefix
        shared = {id(r): prefix.shared(r.request.prompt_ids) if prefix else 0 for r in self.waiting}

        def fed(row: DecodeRow) -> int:
            return len(row.request.prompt_ids) - shared[id(row)]

        head = self.waiting[0]
        chosen, width, real = [head], fed(head), fed(head)
        if cap is None:
            chosen = list(self.waiting)
        elif width > cap and not may_chunk:
            return None
        elif width <= cap:
            for row in list(self.waiting)[1:]:
                wider = max(width, fed(row))
                cost = (len(chosen) + 1) * wider
                if cost <= cap and real + fed(row) >= (1 - MAX_PADDING) * cost:
                    chosen, width, real = [*chosen, row], wider, real + fed(row)
        taken = {id(row) for row in chosen}
        self.waiting = deque(row for row in self.waiting if id(row) not in taken)
        skip = [shared[id(row)] for row in chosen]
        prompts = PromptBatch.of(
            [row.request.prompt_ids for row in chosen], self.engine.pad_id, self.device,
            prefix, skip,
        )  # fmt: skip
        return _Joining(chosen, prompts, max(skip))

    def _admit(self, group: _Joining, logits: torch.Tensor) -> float:
        """A group's prompts are complete: keep its first prompt as the prefix for later
        prompts when the current one gave it little, sample the first tokens, merge the rows
        that go on into the running batch. Returns the seconds of guard work."""
        if self.reuse_prefix and group.shared < MIN_SHARED_PREFIX:
            self.prefix = group.prompts.prefix(0)
        values, seconds = self._host_values(group.rows, logits, None)
        for row, row_values in zip(group.rows, values, strict=True):
            if not row.abstains_before():
                row.accept(row_values)
        _cancel_gone(group.rows)
        keep = [i for i, row in enumerate(group.rows) if not row.done]
        if keep:
            kv = group.prompts.state()
            if len(keep) < len(group.rows):
                kv.select(keep)
            self.kv = kv if self.kv is None else merge(self.kv, kv)
            self.rows += [group.rows[i] for i in keep]
        return seconds

    def _prefill(self, group: _Joining, columns: int | None) -> torch.Tensor | None:
        """Feed the group's next ``columns``; its last prompt positions' logits once
        complete. The scope gate reads the final hidden state of that last pass, the
        knowledge gate the residual stream after its layer (every row's last column is
        its last prompt token: the prompts are left-padded); a max-pooled knowledge gate
        reads every pass's columns (`PromptBatch.keep_gate`, a reused prefix's included)."""
        prompts = group.prompts
        scope, knowledge = self.engine.scope_gate, self.engine.knowledge_gate
        complete = prompts.completes(columns)
        pooled = knowledge is not None and knowledge.pooled
        if not (complete and (scope or knowledge)) and not pooled:
            return prompts.feed(self.model, columns)
        start = prompts.fed
        with contextlib.ExitStack() as stack:
            judging = scope is not None and complete
            hidden = stack.enter_context(FinalHiddenCapture(self.model)) if judging else None
            residual = stack.enter_context(knowledge.capture(self.model)) if knowledge else None
            logits = prompts.feed(self.model, columns)
        if knowledge is not None and residual is not None:
            if pooled:
                prompts.keep_gate(start, knowledge.logits(residual.take_all()))
            if complete:
                risks = risks_of(prompts.gate_max()) if pooled else knowledge.risks(residual.take())
                for row, risk in zip(group.rows, risks, strict=True):
                    row.prompt_risk = risk
        if scope is not None and hidden is not None:
            for row, verdict in zip(group.rows, scope.judge(hidden.take()), strict=True):
                row.scope = verdict
        return logits

    def _decode(self) -> tuple[int, float]:
        """Feed every running row its pending token, score it, sample the next; rows that
        are done leave. Returns the tokens scored and the seconds of guard work."""
        kv, rows = self.kv, self.rows
        if kv is None:
            raise RuntimeError("running rows without a KV cache")
        # When every row ends with the token fed now (max_tokens), nothing is sampled
        # after it: run the body without the LM head (no logits needed).
        last = all(len(row.tokens) + 1 >= row.params.max_tokens for row in rows)
        step_ids = torch.as_tensor([[row.pending[0]] for row in rows if row.pending])
        kv.grow()
        logits, measured = self._forward(kv, step_ids.to(self.device), last=last)
        values, seconds = self._host_values(rows, logits, measured)
        started = time.perf_counter()
        for row, row_values in zip(rows, values, strict=True):
            row.accept(row_values)
        _cancel_gone(rows)
        seconds += time.perf_counter() - started
        self._prune(after_last=last)
        return len(rows), seconds

    def _forward(
        self, kv: KVBatch, step_ids: torch.Tensor, *, last: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The decode pass under the neuron capture: logits (None on the last pass) and
        the fed tokens' CETT ``[rows, K]`` (None unguarded)."""
        capture = self.capture
        if capture is None:  # unguarded: the last token needs no measurement at all
            return (None if last else kv.decode(self.model, step_ids)), None
        with capture:
            if not last:
                return kv.decode(self.model, step_ids), capture.pop_last()
            # The last pass runs only as far as the probe reads; the capture's hook on
            # that layer was registered first, so it runs before the stop.
            scorer = self.engine.scorer
            layers = scorer.layers if scorer is not None else []
            last_layer = self.engine.mlp_layers[max(layers)].module
            kv.feed_until(self.model, step_ids, last_layer)
            return None, capture.pop_last()

    def _host_values(
        self, rows: Sequence[DecodeRow], logits: torch.Tensor | None, measured: torch.Tensor | None
    ) -> tuple[list[list[float]], float]:
        """``[rows, 3 (+ 1 + layers)]`` on the host (next id, log-prob, entropy, the fed
        tokens' measurement), and the seconds of guard work: the pass's one host sync."""
        if logits is None:
            next_ids = torch.full((len(rows),), -1, dtype=torch.long, device=self.device)
        else:
            params = [row.params for row in rows]
            generators = [row.generator for row in rows]
            next_ids = sample_next(logits, params, generators, self.engine.end_ids)
        started = time.perf_counter()
        parts = [next_ids.double()[:, None]]
        scorer = self.engine.scorer
        if scorer is not None and logits is not None:
            logprob, entropy = logit_statistics(logits, next_ids)
            parts += [logprob.double()[:, None], entropy.double()[:, None]]
        else:  # unguarded, or the final pass: no statistics needed
            parts.append(torch.zeros((len(rows), 2), dtype=torch.float64, device=self.device))
        if scorer is not None and measured is not None:
            parts.append(scorer.measure(measured).double())
        values = torch.cat(parts, dim=1).tolist()
        return values, time.perf_counter() - started

    def _prune(self, *, after_last: bool) -> None:
        """Drop finished rows from the batch and the cache."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if after_last and keep:
            raise RuntimeError("a row outlived the final pass: its KV cache is incomplete")
        if not keep:
            self.rows, self.kv = [], None
        elif len(keep) < len(self.rows) and self.kv is not None:
            self.kv.select(keep)
            self.rows = [self.rows[i] for i in keep]


def _cancel_gone(rows: Sequence[DecodeRow]) -> None:
    """Finish the rows whose client went away."""
    for row in rows:
        if not row.done and row.request.sink.cancelled():
            row.finish("cancelled")


def _drop_cancelled(group: _Joining) -> bool:
    """Finish and drop a joining group's cancelled rows; False when none is left."""
    keep = [i for i, row in enumerate(group.rows) if not row.request.sink.cancelled()]
    if len(keep) < len(group.rows):
        _cancel_gone(group.rows)
        if keep:
            group.prompts.select(keep)
        group.rows = [group.rows[i] for i in keep]
    return bool(group.rows)
