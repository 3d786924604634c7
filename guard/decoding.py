"""One request's side of guarded decoding: what it asks, what it receives, its running state.

`GenerationRequest` (prompt ids, `SamplingParams`, a `GenerationSink`) goes into a running
batch (`guard.livebatch.LiveBatch`); its sink receives a `TokenEvent` per scored token and
one `GenerationResult`. `DecodeRow` is the request's decoding state inside the batch; per step
and row (docs/ARCHITECTURE.md, "Position"):

- the token sampled at step ``t`` is the input of step ``t + 1``: its CETT, hence its probe
  logit, is read there; its log-prob and entropy come from the raw logits of step ``t``
  (temperature 1, before temperature/top-p), sampling uses the processed logits; a row's
  first token is sampled from its prompt pass;
- an end token is not a response token: the row stops without feeding it; a row that
  stops on ``max_tokens`` or a stop string has had its last token fed already, so every
  response token is scored;
- finished, aborted or cancelled rows leave the batch at once.

What the numbers mean is the scorer's business (`RiskScorer`), what to do about them the
policy's (`Policy`): the row only takes the batch's measurements and reports. Sampling and
stop strings live in `guard.sampling`; each request samples from its own generator, so a
seeded request gives the same answer alone or in any batch.

    request = GenerationRequest(prompt_ids, SamplingParams(max_tokens=32), sink)
    decode_batch(engine, [request])    # guard.livebatch: sink.on_token(...), sink.on_finish(...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.knowledge import KnowledgeGate
from guard.neurons import MLPLayer
from guard.policy import Policy
from guard.results import (
    FinishReason,
    GenerationResult,
    GuardInfo,
    ScopeVerdict,
    SpanRisk,
    TokenRisk,
)
from guard.sampling import SamplingParams, TextTracker, sample_next
from guard.scope import ScopeGate
from guard.scoring import RiskScorer, RunningStats
from guard.spans import SentenceStream, scored_spans

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
    "sample_next",
]


@dataclass(frozen=True)
class TokenEvent:
    """One scored response token as it is produced.

    ``delta`` is the answer text that became safe to send with it (possibly empty: text
    that may start a stop string, or half a UTF-8 character, is held back). ``scope`` and
    ``prompt_risk`` are the request's scope verdict and knowledge gate risk (known from the
    prompt pass on), None without those gates. ``riskiest_span``: the riskiest sentence
    of the answer so far that is final (`guard.spans.SentenceStream`; None before one is).
    """

    index: int
    token: TokenRisk
    delta: str
    running_risk: float | None
    scope: ScopeVerdict | None = None
    prompt_risk: float | None = None
    riskiest_span: SpanRisk | None = None


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
    """Per `LiveBatch.step`, for metrics: rows fed in its decode pass (the rows that joined
    in it included), tokens scored, seconds of guard work, and rows that joined."""

    batch_size: int
    scored_tokens: int
    scoring_seconds: float
    joined: int = 0


@dataclass(frozen=True)
class DecodeEngine:
    """What the loop needs: model, tokenizer, the scorer (None = unguarded), the policy
    that decides, the scope gate (None = every prompt in scope) and the knowledge gate
    (None = no prompt risk)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    scorer: RiskScorer | None
    policy: Policy
    info: GuardInfo
    end_ids: frozenset[int]
    mlp_layers: list[MLPLayer]
    pad_id: int
    scope_gate: ScopeGate | None = None
    knowledge_gate: KnowledgeGate | None = None


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
    sentences: SentenceStream | None = None  # guarded rows, from their first scored token
    layer_sums: np.ndarray | None = None
    pending: tuple[int, float, float] | None = None  # sampled, not yet fed: id, logprob, entropy
    scope: ScopeVerdict | None = None
    prompt_risk: float | None = None
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
        delta = self.tracker.push(token_id)
        finished: list[SpanRisk] = []
        if scorer is not None:
            s = float(measured[0])
            parts = np.asarray(measured[1:], dtype=np.float64)
            self.layer_sums = parts if self.layer_sums is None else self.layer_sums + parts
            self.running.update(s, logprob, entropy)
            risk = scorer.token_risk(s, logprob, entropy, index)
            running = scorer.answer_risk(self.running.stats())
            if self.sentences is None:
                self.sentences = SentenceStream(scorer)
            tracker = self.tracker
            finished = self.sentences.push(tracker.text, tracker.delivered, s, logprob, entropy)
        text = str(self.engine.tokenizer.decode([token_id], skip_special_tokens=True))
        token = TokenRisk(token_id, text, risk)
        self.tokens.append(token)
        riskiest = self.sentences.riskiest if self.sentences is not None else None
        event = TokenEvent(index, token, delta, running, self.scope, self.prompt_risk, riskiest)
        self.request.sink.on_token(event)
        if self.tracker.stopped:
            self.finish("stop")
        elif (
            self.params.abort
            and running is not None
            and self.engine.policy.should_abort(
                running, len(self.tokens), self.scope, [span.risk for span in finished]
            )
        ):
            self.finish("content_filter", aborted=True)
        if not self.done and len(self.tokens) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: FinishReason, *, aborted: bool = False) -> None:
        self.done = True
        self.request.sink.on_finish(self._result(reason, aborted))

    def abstains_before(self) -> bool:
        """After the prompt pass: the policy abstains on the prompt alone. The row then
        ends unanswered (``content_filter``, nothing generated)."""
        if not self.engine.policy.abstains_before(self.prompt_risk, self.scope):
            return False
        self.done = True
        result = self._result("content_filter", aborted=False)
        self.request.sink.on_finish(replace(result, before_generation=True))
        return True

    def _result(self, reason: FinishReason, aborted: bool) -> GenerationResult:
        engine, scorer = self.engine, self.engine.scorer
        risk, layers, spans = None, {}, []
        sentences, layer_sums = self.sentences, self.layer_sums
        if scorer is not None and sentences is not None and layer_sums is not None:  # scored
            risk = scorer.answer_risk(self.running.stats())
            layers = scorer.layer_shares(layer_sums, self.running.length)
            ids = [token.token_id for token in self.tokens]
            s, logprob, entropy = sentences.token_values().T
            text_length = len(self.tracker.text)
            spans = scored_spans(scorer, engine.tokenizer, ids, s, logprob, entropy, text_length)
        return GenerationResult(
            info=engine.info, risk=risk,
            decision=engine.policy.decide(
                risk, scope=self.scope, aborted=aborted, prompt_risk=self.prompt_risk
            ),
            tokens=list(self.tokens), layers=layers, aborted=aborted, scope=self.scope,
            spans=spans, prompt_risk=self.prompt_risk,
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
