"""What the vLLM engine thread keeps per request, and how each step's values reach it.

A generation is a `DecodeRow` (guard.decoding): the same bookkeeping as our own decode
loop, fed the same per-step values ``[sampled id, log-prob, entropy, measure of the fed
token...]``, so scoring, events, stop strings, the policy's abort and the result are one
implementation. vLLM is asked for ``max_tokens + 1`` tokens so that the last response
token is fed (and measured) once; the row finishes at ``max_tokens`` and the extra sample
is dropped. A teacher-forced score is one prompt pass over prompt + answer. The step that
reaches a prompt's last token gives its gates' inputs (`PromptGates`): the scope verdict
and the knowledge gate's ``prompt_risk``, and with them the policy's one chance to abstain
before generating (the token vLLM sampled in that step is then never fed).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.batching import Ticket
from guard.decoding import DecodeRow, RowContext, TextTracker
from guard.errors import CaptureError
from guard.generation import judge_answer
from guard.knowledge import KnowledgeGate
from guard.results import ScopeVerdict, ScoreResult
from guard.sampling import SamplingParams
from guard.scope import ScopeGate
from guard.vllm_engine.capture import StepRecord


@dataclass(frozen=True)
class PromptGates:
    """The probe's gates on the last prompt token (None: the probe has none, or off)."""

    scope: ScopeGate | None = None
    knowledge: KnowledgeGate | None = None

    def judge(self, record: StepRecord) -> tuple[ScopeVerdict | None, float | None] | None:
        """(scope verdict, prompt risk) from the step that reached the prompt's last
        token; None for any other step."""
        hidden, residual = record.prompt_hidden, record.prompt_residual
        if hidden is None and residual is None:
            return None
        scope = None if self.scope is None or hidden is None else self.scope.judge(hidden[None])[0]
        knowledge, risk = self.knowledge, None
        if knowledge is not None and residual is not None:
            risk = knowledge.risks(residual[None])[0]
        return scope, risk


def vllm_params(params: SamplingParams, end_ids: frozenset[int], *, forced: bool = False) -> Any:
    """vLLM's sampling parameters for ours: token ids in, deltas out, no detokenising
    (our `TextTracker` does stop strings), our end tokens stop it; ``ignore_eos`` masks
    them instead (as `guard.sampling.sample_next` does; statistics stay raw)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    options: dict[str, Any] = {
        "n": 1, "max_tokens": 1 if forced else params.max_tokens + 1,
        "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
        "detokenize": False, "output_kind": RequestOutputKind.DELTA,
    }  # fmt: skip
    if params.ignore_eos:
        options.update(ignore_eos=True, logit_bias={i: -100.0 for i in sorted(end_ids)})
    else:
        options["stop_token_ids"] = sorted(end_ids)
    return VLLMSamplingParams(**options)


@dataclass
class Generation:
    """A streamed generation: its ticket (the API's stream) and its row."""

    ticket: Ticket
    row: DecodeRow
    req_id: str = ""  # vLLM's internal id (the worker sees it)
    measured_lag: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, ticket: Ticket, context: RowContext) -> Generation:
        request = ticket.request
        tracker = TextTracker(context.tokenizer, request.params.stop)
        return cls(ticket, DecodeRow(request, context, tracker, None))

    def absorb(self, record: StepRecord | None, gates: PromptGates) -> bool:
        """What a step measured for this request (a step may produce no token for it:
        a prefill chunk, a recomputation after preemption). True: it read the prompt's
        gates."""
        if record is None:
            return False
        self.measured_lag.update(record.measured)
        verdicts = gates.judge(record)
        if verdicts is None:
            return False
        self.row.scope, self.row.prompt_risk = verdicts
        return True

    def feed(self, token_ids: list[int], record: StepRecord | None, gates: PromptGates) -> None:
        """One step's output for this request (usually one new token). After the prompt
        pass the policy may abstain on the prompt alone: the row then ends unanswered and
        the engine aborts its vLLM request."""
        row = self.row
        first = not row.tokens and row.pending is None
        if self.absorb(record, gates) and first and row.abstains_before():
            return
        for token_id in token_ids:
            if row.done:
                return
            if record is None or record.sampled is None or record.sampled[0] != token_id:
                raise CaptureError(f"no captured statistics for token {token_id} of {self.req_id}")
            values = list(record.sampled)
            if row.pending is not None and row.engine.scorer is not None:
                measured = self.measured_lag.pop(len(row.tokens), None)
                if measured is None:
                    raise CaptureError(f"token {len(row.tokens)} of {self.req_id} was not measured")
                values += measured
            row.accept(values)


@dataclass
class Scoring:
    """A teacher-forced score: prompt + answer in one prompt pass (``max_tokens=1``)."""

    prompt_ids: list[int]
    response_ids: list[int]
    future: Future[ScoreResult]
    req_id: str = ""
    measured: dict[int, list[float]] = field(default_factory=dict)
    forced: dict[int, tuple[float, float]] = field(default_factory=dict)
    scope: ScopeVerdict | None = None
    prompt_risk: float | None = None

    def absorb(self, record: StepRecord | None, gates: PromptGates) -> bool:
        """What a step measured: answer rows, predictions, the prompt's gates."""
        if record is None:
            return False
        self.measured.update(record.measured)
        self.forced.update(record.forced)
        verdicts = gates.judge(record)
        if verdicts is not None:
            self.scope, self.prompt_risk = verdicts
        return verdicts is not None

    def result(self, context: RowContext) -> ScoreResult:
        """The verdict, through the same `judge_answer` as the transformers engine."""
        if context.scorer is None:
            return judge_answer(context, self.response_ids)
        n = len(self.response_ids)
        if sorted(self.measured) != list(range(n)) or sorted(self.forced) != list(range(n)):
            raise CaptureError(
                f"teacher forcing measured {len(self.measured)} and predicted "
                f"{len(self.forced)} of {n} answer tokens (prefix caching?)"
            )
        measured = np.asarray([self.measured[i] for i in range(n)], dtype=np.float64)
        stats = np.asarray([self.forced[i] for i in range(n)], dtype=np.float64)
        return judge_answer(context, self.response_ids, (measured, stats[:, 0], stats[:, 1]),
                            self.scope, self.prompt_risk)  # fmt: skip
