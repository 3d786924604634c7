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

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from guard.batching import Ticket
from guard.decoding import DecodeRow, RowContext, TextTracker
from guard.errors import CaptureError
from guard.generation import judge_answer
from guard.knowledge import KnowledgeGate, risks_of
from guard.results import ScopeVerdict, ScoreResult
from guard.sampling import SamplingParams
from guard.scope import ScopeGate
from guard.vllm_engine.capture import measure_args
from guard.vllm_engine.channel import Received


@dataclass(frozen=True)
class PromptGates:
    """The probe's gates on the last prompt token (None: the probe has none, or off)."""

    scope: ScopeGate | None = None
    knowledge: KnowledgeGate | None = None

    def ready(self, got: Received) -> bool:
        """Whether the inputs of every gate there is have arrived."""
        knowledge = self.knowledge
        return (self.scope is None or got.hidden is not None) and (
            knowledge is None
            or (got.prompt_logit if knowledge.pooled else got.residual) is not None
        )

    def judge(self, got: Received) -> tuple[ScopeVerdict | None, float | None]:
        """(scope verdict, prompt risk) from the inputs at the prompt's last token (a
        max-pooled knowledge gate: the worker's max over every prompt token)."""
        scope = None
        if self.scope is not None and got.hidden is not None:
            scope = self.scope.judge(torch.tensor([got.hidden]))[0]
        risk, knowledge = None, self.knowledge
        if knowledge is not None and knowledge.pooled and got.prompt_logit is not None:
            risk = risks_of(torch.tensor([got.prompt_logit]))[0]
        elif knowledge is not None and got.residual is not None:
            risk = knowledge.risks(torch.tensor([got.residual]))[0]
        return scope, risk


Wait = Callable[[Callable[[], bool], str], None]  # `FrameReader.wait`: until ready, or fail


def vllm_params(
    params: SamplingParams, end_ids: frozenset[int], prompt_len: int, *, forced: bool = False
) -> Any:
    """vLLM's sampling parameters for ours: token ids in, deltas out, no detokenising
    (our `TextTracker` does stop strings), our end tokens stop it; ``ignore_eos`` masks
    them instead (as `guard.sampling.sample_next` does; statistics stay raw). The
    ``extra_args`` ask the capture to measure the request (`measure_args`) and tell it that
    a generation's last sample is dropped (its step computes less: `TailSkip`)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    options: dict[str, Any] = {
        "n": 1, "max_tokens": 1 if forced else params.max_tokens + 1,
        "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
        "detokenize": False, "output_kind": RequestOutputKind.DELTA,
        "extra_args": measure_args(prompt_len, forced=forced, drops_last=not forced),
    }  # fmt: skip
    if params.ignore_eos:
        options.update(ignore_eos=True, logit_bias={i: -100.0 for i in sorted(end_ids)})
    else:
        options["stop_token_ids"] = sorted(end_ids)
    return VLLMSamplingParams(**options)


@dataclass
class Generation:
    """A streamed generation: its ticket (the API's stream), its row, and what the capture
    has sent for it."""

    ticket: Ticket
    row: DecodeRow
    got: Received = field(default_factory=Received)
    req_id: str = ""  # vLLM's internal id (the worker sees it)
    outputs: int = 0  # tokens vLLM has given so far

    @classmethod
    def of(cls, ticket: Ticket, context: RowContext) -> Generation:
        request = ticket.request
        tracker = TextTracker(context.tokenizer, request.params.stop)
        return cls(ticket, DecodeRow(request, context, tracker, None))

    def feed(self, token_ids: list[int], gates: PromptGates, wait: Wait) -> None:
        """One output of vLLM for this request (usually one new token), each token with
        the values of the step that sampled it (and of the step that fed the one before).
        With the first token the prompt's gates are read: the policy may abstain on the
        prompt alone; the row then ends unanswered and the engine aborts its vLLM request."""
        row, got = self.row, self.got
        if self.outputs == 0 and token_ids:
            wait(lambda: gates.ready(got), f"the prompt of {self.req_id}")
            row.scope, row.prompt_risk = gates.judge(got)
            if row.abstains_before():
                return
        for token_id in token_ids:
            if row.done:
                return
            index, fed = self.outputs, len(row.tokens)
            self.outputs += 1
            measure = row.pending is not None and row.engine.scorer is not None
            wait(partial(got.has_token, index, fed if measure else None),
                 f"token {index} of {self.req_id}")  # fmt: skip
            sampled = got.sampled.pop(index)
            if sampled[0] != token_id:
                raise CaptureError(
                    f"token {index} of {self.req_id}: vLLM gave {token_id}, the capture saw "
                    f"{sampled[0]} sampled"
                )
            row.accept([*sampled, *(got.measured.pop(fed) if measure else [])])


@dataclass
class Scoring:
    """A teacher-forced score: prompt + answer in one prompt pass (``max_tokens=1``)."""

    prompt_ids: list[int]
    response_ids: list[int]
    future: Future[ScoreResult]
    got: Received = field(default_factory=Received)
    req_id: str = ""

    def result(self, context: RowContext, gates: PromptGates, wait: Wait) -> ScoreResult:
        """The verdict, through the same `judge_answer` as the transformers engine, once
        every answer token's values have arrived."""
        if context.scorer is None:
            return judge_answer(context, self.response_ids)
        got, n = self.got, len(self.response_ids)

        def complete() -> bool:
            return gates.ready(got) and all(i in got.measured and i in got.forced for i in range(n))

        wait(complete, f"the {n} answer tokens of {self.req_id} (prefix caching?)")
        scope, prompt_risk = gates.judge(got)
        measured = np.asarray([got.measured[i] for i in range(n)], dtype=np.float64)
        stats = np.asarray([got.forced[i] for i in range(n)], dtype=np.float64)
        return judge_answer(context, self.response_ids, (measured, stats[:, 0], stats[:, 1]),
                            scope, prompt_risk)  # fmt: skip
