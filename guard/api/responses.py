"""The HTTP protocol's response bodies: completions, stream chunks, the ``guard`` object.

Every body the API sends is one of these models (built by `guard.api.bodies`), so
``/openapi.json`` documents what clients receive and the fuzz test holds the server to it.

    GuardObject(risk=0.97, decision=Decision.ABSTAIN, ...).model_dump(mode="json")
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from guard.results import Decision

FinishReason = Literal["stop", "length", "content_filter"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenScore(BaseModel):
    """One response token and its own risk."""

    text: str | None = Field(
        description="the token's text; null when the answer was withheld (abstained)"
    )
    risk: float | None = Field(description="the token's display risk; null when unguarded")


class SpanScore(BaseModel):
    """One sentence of the answer and the risk of its tokens alone."""

    start: int = Field(description="offset of the sentence's first character in the answer")
    end: int = Field(description="offset just past its last character")
    risk: float = Field(
        description="the sentence's risk, scored as if it were the whole answer; it shows "
        "where the risk is, the decision is the answer risk's (and, with "
        "GUARD_ABORT_ON_SENTENCES, a stream's abort may act on it)"
    )


class ScopeScore(BaseModel):
    """The probe's scope gate on the prompt."""

    in_scope: bool = Field(
        description="true: the answer is judged; false: its risk is shown but does not count "
        "(the decision is pass, a stream is never aborted)"
    )
    score: float = Field(description="p(the prompt is a short factual question)")


class ProbeRef(BaseModel):
    name: str
    sha256: str | None


class Thresholds(BaseModel):
    """The policy's thresholds on the answer risk (and on the prompt risk)."""

    flag: float
    abstain: float
    abort: float | None = Field(default=None, description="mid-stream abort; null when off")
    prompt_flag: float | None = Field(
        default=None, description="flag line on prompt_risk; null: the probe has no knowledge gate"
    )
    prompt_abstain: float | None = Field(
        default=None, description="abstain line on prompt_risk; null: no knowledge gate"
    )


class RunningGuard(BaseModel):
    """The ``guard`` object of a non-final stream chunk: the risk so far and this chunk's
    token (none in the chat stream's first, role-only chunk)."""

    risk: float | None = Field(
        description="running risk of the answer so far; null when unguarded or before a token"
    )
    tokens: list[TokenScore]
    scope: ScopeScore | None = Field(description="null: the probe has no scope gate (all judged)")
    prompt_risk: float | None = Field(
        default=None,
        description="the knowledge gate's probability that the prompt asks about something "
        "the model does not know (known before the first token); null: the probe has no "
        "knowledge gate",
    )
    riskiest_span: SpanScore | None = Field(
        default=None,
        description="the riskiest sentence of the answer so far that is final (a sentence "
        "is final once 12 characters of the next one follow it, or the answer ends); it is "
        "one of the final `spans`, with the same offsets and risk; null before one is",
    )
    guarded: bool = Field(description="false: served without a probe, nothing is judged")


class GuardObject(RunningGuard):
    """The verdict on a whole answer: in a non-streamed response, the final stream chunk
    (whose ``tokens`` are empty: they came one per chunk) and ``/v1/guard/score``."""

    decision: Decision
    aborted: bool = Field(description="true: a stream was stopped mid-answer by the abort rule")
    withheld: bool = Field(
        description="true: this response replaced the answer by GUARD_ABSTAIN_MESSAGE, and "
        "its tokens carry their risks without their text"
    )
    layers: dict[str, float] = Field(
        description="each probe layer's signed share of the answer's probe logit"
    )
    spans: list[SpanScore] = Field(
        description="the answer's sentences (character offsets into the answer as generated) "
        "with their risks; empty when unguarded"
    )
    probe: ProbeRef | None
    thresholds: Thresholds | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: FinishReason
    logprobs: None = None


class _Body(BaseModel):
    """What every completion body and chunk starts with."""

    id: str
    created: int
    model: str


class _Chunk(_Body):
    guard: GuardObject | RunningGuard | None = Field(
        default=None, description="null only in the usage chunk"
    )
    usage: Usage | None = Field(default=None, description="only in the usage chunk")


class ChatCompletion(_Body):
    """``POST /v1/chat/completions`` without ``stream``."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    guard: GuardObject


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Chunk):
    """One ``data:`` event of a chat stream: the role (first), a token, the verdict (with
    ``finish_reason``), or, last and only with ``stream_options.include_usage``, the usage
    (no choices)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class TextCompletion(_Body):
    """``POST /v1/completions`` without ``stream``."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage
    guard: GuardObject


class TextCompletionChunk(_Chunk):
    """One ``data:`` event of a text completion stream (as `ChatCompletionChunk`, no role)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


class ScoreResponse(_Body):
    """``POST /v1/guard/score``: the verdict on the given answer (its tokens keep their
    text, which is the client's own)."""

    object: Literal["guard.score"] = "guard.score"
    guard: GuardObject
    usage: Usage


class Readiness(BaseModel):
    """``GET /readyz`` once model and probe are loaded and verified."""

    status: Literal["ready"] = "ready"
    model: str
    guarded: bool
    probe: str | None
    probe_sha256: str | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hallucination-guard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
