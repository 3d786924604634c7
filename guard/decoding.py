"""The batched decode loop of guarded generation: KV cache, sampling, per-token risk.

One call decodes a batch of requests together (left-padded prompts, positions from the
attention mask, one `DynamicCache`), inside one `NeuronCapture` on the probe's neurons.
Per step and row (docs/ARCHITECTURE.md, "Position"):

- the token sampled at step ``t`` is the input of step ``t + 1``: its CETT, hence its probe
  logit, is read there; its log-prob and entropy come from the raw logits of step ``t``
  (temperature 1, before temperature/top-p), sampling uses the processed logits;
- an end token is not a response token: the row stops without feeding it; a row that
  stops on ``max_tokens`` or a stop string has had its last token fed already, so every
  response token is scored;
- finished or cancelled rows leave the batch (the cache keeps only live rows);
- when every live row ends with the token being fed, that last pass skips the LM head and
  stops after the last probed layer.

Sampling and stop strings live in `guard.sampling`.

Per step there is one device-to-host copy, ``[batch, 4 + layers]`` floats: next ids,
their log-prob and entropy, and the fed tokens' `RiskScorer.measure` (probe logit and
per-layer parts). What the numbers mean is the scorer's business, what to do about them
the policy's: the loop only measures and reports.

    decode_batch(engine, [GenerationRequest(prompt_ids, SamplingParams(max_tokens=32), sink)])
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.forcing import position_ids_for
from guard.hooks import Hook, ModelHooks
from guard.model import left_pad
from guard.neurons import MLPLayer, NeuronCapture
from guard.policy import Policy
from guard.results import FinishReason, GenerationResult, GuardInfo, ScopeVerdict, TokenRisk
from guard.sampling import SamplingParams, TextTracker, sample_next
from guard.scope import FinalHiddenCapture, ScopeGate
from guard.scoring import RiskScorer, RunningStats, logit_statistics

__all__ = [
    "DecodeEngine",
    "DecodeRow",
    "GenerationRequest",
    "GenerationSink",
    "RowContext",
    "SamplingParams",
    "StepInfo",
    "TextTracker",
    "TokenEvent",
    "cache_argument",
    "decode_batch",
    "sample_next",
]


@dataclass(frozen=True)
class TokenEvent:
    """One scored response token as it is produced.

    ``delta`` is the answer text that became safe to send with it (possibly empty: text
    that may start a stop string, or half a UTF-8 character, is held back). ``scope`` is
    the request's scope verdict (known from the prompt pass on), None without a gate.
    """

    index: int
    token: TokenRisk
    delta: str
    running_risk: float | None
    scope: ScopeVerdict | None = None


class GenerationSink(Protocol):
    """Receives one request's events, on the decoding thread."""

    def on_token(self, event: TokenEvent) -> None: ...
    def on_finish(self, result: GenerationResult) -> None: ...
    def cancelled(self) -> bool: ...


@dataclass
class GenerationRequest:
    """A tokenised prompt, how to decode it, and where its events go."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: GenerationSink


@dataclass(frozen=True)
class StepInfo:
    """Per decode step, for metrics: rows in the batch and guard work per scored token."""

    batch_size: int
    scored_tokens: int
    scoring_seconds: float


@dataclass(frozen=True)
class DecodeEngine:
    """What the loop needs: model, tokenizer, the scorer (None = unguarded), the policy
    that decides, and the scope gate (None = every prompt in scope)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    scorer: RiskScorer | None
    policy: Policy
    info: GuardInfo
    end_ids: frozenset[int]
    mlp_layers: list[MLPLayer]
    pad_id: int
    scope_gate: ScopeGate | None = None


class RowContext(Protocol):
    """What one row's bookkeeping reads (`DecodeEngine` here; the vLLM engine has its own)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...
    @property
    def scorer(self) -> RiskScorer | None: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def info(self) -> GuardInfo: ...
    @property
    def end_ids(self) -> frozenset[int]: ...


@dataclass
class DecodeRow:
    """One request's decoding state: takes each step's values (`accept`), scores the fed
    token through the scorer, sends events, asks the policy, builds the result. Whatever
    engine runs the forward passes feeds it the same per-step values."""

    request: GenerationRequest
    engine: RowContext
    tracker: TextTracker
    generator: torch.Generator | None
    running: RunningStats = field(default_factory=RunningStats)
    tokens: list[TokenRisk] = field(default_factory=list)
    layer_sums: np.ndarray | None = None
    pending: tuple[int, float, float] | None = None  # sampled, not yet fed: id, logprob, entropy
    scope: ScopeVerdict | None = None
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def accept(self, values: Sequence[float]) -> None:
        """Take the step's host values ``[next_id, logprob, entropy, s, shares...]``."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._score(pending, values[3:])
            if self.done:
                return
        next_id = int(values[0])
        if next_id < 0:  # the final pass sampled nothing (cannot happen before max_tokens)
            self.finish("length")
        elif next_id in self.engine.end_ids:
            self.finish("stop")
        else:
            self.pending = (next_id, float(values[1]), float(values[2]))

    def _score(self, pending: tuple[int, float, float], measured: Sequence[float]) -> None:
        """Score the token fed in this step, send it, and ask the policy whether to go on."""
        token_id, logprob, entropy = pending
        scorer, risk, running = self.engine.scorer, None, None
        index = len(self.tokens)
        if scorer is not None:
            s = float(measured[0])
            parts = np.asarray(measured[1:], dtype=np.float64)
            self.layer_sums = parts if self.layer_sums is None else self.layer_sums + parts
            self.running.update(s, logprob, entropy)
            risk = scorer.token_risk(s, logprob, entropy, index)
            running = scorer.answer_risk(self.running.stats())
        text = str(self.engine.tokenizer.decode([token_id], skip_special_tokens=True))
        token = TokenRisk(token_id, text, risk)
        self.tokens.append(token)
        delta = self.tracker.push(token_id)
        self.request.sink.on_token(TokenEvent(index, token, delta, running, self.scope))
        if self.tracker.stopped:
            self.finish("stop")
        elif (
            self.params.abort
            and running is not None
            and self.engine.policy.should_abort(running, len(self.tokens), self.scope)
        ):
            self.finish("content_filter", aborted=True)
        if not self.done and len(self.tokens) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: FinishReason, *, aborted: bool = False) -> None:
        self.done = True
        self.request.sink.on_finish(self._result(reason, aborted))

    def _result(self, reason: FinishReason, aborted: bool) -> GenerationResult:
        engine, scorer = self.engine, self.engine.scorer
        risk, layers = None, {}
        if scorer is not None and self.layer_sums is not None:  # at least one token scored
            risk = scorer.answer_risk(self.running.stats())
            layers = scorer.layer_shares(self.layer_sums, self.running.length)
        return GenerationResult(
            info=engine.info, risk=risk,
            decision=engine.policy.decide(risk, scope=self.scope, aborted=aborted),
            tokens=list(self.tokens), layers=layers, aborted=aborted, scope=self.scope,
            text=self.tracker.text, finish_reason=reason,
            prompt_tokens=len(self.request.prompt_ids), trailing=self.tracker.flush(),
        )  # fmt: skip


def _make_row(engine: DecodeEngine, request: GenerationRequest, device: torch.device) -> DecodeRow:
    generator = None
    if request.params.temperature > 0:
        generator = torch.Generator(device=device)
        if request.params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.params.seed)
    tracker = TextTracker(engine.tokenizer, request.params.stop)
    return DecodeRow(request, engine, tracker, generator)


def cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed layer has run."""


def _stop_forward(module: torch.nn.Module, inputs: object, output: object) -> None:
    raise _StopForward


def decode_batch(
    engine: DecodeEngine,
    requests: Sequence[GenerationRequest],
    on_step: Callable[[StepInfo], None] | None = None,
) -> None:
    """Decode ``requests`` together; every request's sink gets its tokens and one result."""
    if not requests:
        return
    decoder = _BatchDecoder(engine, requests, on_step)
    capture: contextlib.AbstractContextManager[NeuronCapture | None] = contextlib.nullcontext()
    if engine.scorer is not None:
        capture = NeuronCapture(
            engine.model,
            engine.scorer.neuron_selection(),
            layers=engine.mlp_layers,
            last_position=True,
        )
    with torch.inference_mode(), capture as active:
        decoder.run(active)


class _BatchDecoder:
    """The state of one batched decode: live rows, attention mask, positions, KV cache."""

    def __init__(
        self,
        engine: DecodeEngine,
        requests: Sequence[GenerationRequest],
        on_step: Callable[[StepInfo], None] | None,
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = next(self.model.parameters()).device
        self.live = [_make_row(engine, request, self.device) for request in requests]
        self.on_step = on_step
        self.cache = DynamicCache()
        self.cache_kw = cache_argument(self.model)
        input_ids, self.mask = left_pad([r.prompt_ids for r in requests], engine.pad_id)
        self.input_ids, self.mask = input_ids.to(self.device), self.mask.to(self.device)
        self.positions = position_ids_for(self.mask)

    def run(self, capture: NeuronCapture | None) -> None:
        logits = self._prefill()
        if capture is not None:
            capture.pop_last()  # prompt positions: not response tokens
        self.positions = self.positions[:, -1:]
        while True:
            self._advance(self._step_values(logits, capture))
            if not self._prune():
                return
            # When every live row ends with the token fed now (max_tokens), nothing is
            # sampled after it: run the body without the LM head (no logits needed).
            last = all(len(row.tokens) + 1 >= row.params.max_tokens for row in self.live)
            step_ids = torch.as_tensor([[row.pending[0] for row in self.live if row.pending]])
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.live), 1))], dim=1)
            self.positions = self.positions + 1
            logits = self._forward(step_ids.T.to(self.device), last=last)

    def _prefill(self) -> torch.Tensor | None:
        """The prompt pass; the scope gate reads its final hidden state (no extra work)."""
        gate = self.engine.scope_gate
        if gate is None:
            return self._forward(self.input_ids, last=False)
        with FinalHiddenCapture(self.model) as hidden:
            logits = self._forward(self.input_ids, last=False)
        for row, verdict in zip(self.live, gate.judge(hidden.take()), strict=True):
            row.scope = verdict
        return logits

    def _forward(self, input_ids: torch.Tensor, *, last: bool) -> torch.Tensor | None:
        kwargs = {
            "input_ids": input_ids, "attention_mask": self.mask, "position_ids": self.positions,
            self.cache_kw: self.cache, "use_cache": True,
        }  # fmt: skip
        if last:
            self._final_pass(kwargs)
            return None
        return self.model(**kwargs, logits_to_keep=1).logits[:, -1, :]

    def _final_pass(self, kwargs: dict[str, object]) -> None:
        """Feed the last tokens only as far as the probe reads: no LM head, and no layer
        after the last probed one (the cache is dropped afterwards, so stopping is safe)."""
        scorer = self.engine.scorer
        if scorer is None:  # unguarded: the last token needs no measurement at all
            return
        last_layer = max(scorer.layers, default=None)
        if last_layer is None:
            return
        module = self.engine.mlp_layers[last_layer].module
        # Registered after the capture's hook on that module, so it runs after it.
        stop = ModelHooks(self.model, "early stop", [Hook(module, _stop_forward)])
        with contextlib.suppress(_StopForward), stop:
            self.model.base_model(**kwargs)

    def _step_values(
        self, logits: torch.Tensor | None, capture: NeuronCapture | None
    ) -> tuple[list[list[float]], float]:
        """``[rows, 3 (+ 1 + layers)]`` on the host, and the seconds of guard work."""
        rows = len(self.live)
        if logits is None:
            next_ids = torch.full((rows,), -1, dtype=torch.long, device=self.device)
        else:
            params = [row.params for row in self.live]
            generators = [row.generator for row in self.live]
            next_ids = sample_next(logits, params, generators, self.engine.end_ids)
        started = time.perf_counter()
        parts = [next_ids.double()[:, None]]
        scorer = self.engine.scorer
        if capture is not None and scorer is not None and logits is not None:
            logprob, entropy = logit_statistics(logits, next_ids)
            parts += [logprob.double()[:, None], entropy.double()[:, None]]
        else:  # unguarded, or the final pass: no statistics needed
            parts.append(torch.zeros((rows, 2), dtype=torch.float64, device=self.device))
        if capture is not None and scorer is not None and self.live[0].pending is not None:
            parts.append(scorer.measure(capture.pop_last()).double())
        values = torch.cat(parts, dim=1).tolist()  # the step's one host sync
        return values, time.perf_counter() - started

    def _advance(self, step: tuple[list[list[float]], float]) -> None:
        values, seconds = step
        started = time.perf_counter()
        scored = sum(row.pending is not None for row in self.live)
        for row, row_values in zip(self.live, values, strict=True):
            row.accept(row_values)
        if self.on_step is not None:
            seconds += time.perf_counter() - started
            self.on_step(StepInfo(len(self.live), scored, seconds))
        for row in self.live:
            if not row.done and row.request.sink.cancelled():
                row.finish("cancelled")

    def _prune(self) -> bool:
        """Drop finished rows from the batch and the cache; False when none is left."""
        keep = [i for i, row in enumerate(self.live) if not row.done]
        if keep and len(keep) < len(self.live):
            index = torch.as_tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.live = [self.live[i] for i in keep]
        return bool(keep)
