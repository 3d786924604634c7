"""Every response body of the completion and score routes, built from guard results.

The one builder of the ``guard`` object (whole answers, stream chunks, ``hguard score``),
and the one place an abstained answer is withheld (`final_answer`): a non-streamed
abstention carries ``GUARD_ABSTAIN_MESSAGE`` as its text, ``finish_reason:
"content_filter"``, and tokens with their risks but without their text. Streams cannot
take back what was sent, so their chunks always carry the text.

    body = completion(envelope, result, settings.abstain_message)
    JSONResponse(body.model_dump(mode="json"), headers=guard_headers(result, request_id))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from guard.api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    FinishReason,
    GuardObject,
    ProbeRef,
    RunningGuard,
    ScopeScore,
    ScoreResponse,
    SpanScore,
    TextChoice,
    TextCompletion,
    TextCompletionChunk,
    Thresholds,
    TokenScore,
    Usage,
)
from guard.decoding import TokenEvent
from guard.results import (
    Decision,
    GenerationResult,
    GuardInfo,
    ScopeVerdict,
    ScoreResult,
    SpanRisk,
    TokenRisk,
)


class PromptVerdicts(Protocol):
    """What a stream item knows about its prompt (token events and results alike)."""

    @property
    def scope(self) -> ScopeVerdict | None: ...
    @property
    def prompt_risk(self) -> float | None: ...


Kind = Literal["chat", "text"]
Chunk = ChatCompletionChunk | TextCompletionChunk


@dataclass(frozen=True)
class Envelope:
    """What every body of one completion shares."""

    kind: Kind
    id: str
    created: int
    model: str


@dataclass(frozen=True)
class Answer:
    """What a non-streamed response says the answer is."""

    text: str
    finish_reason: FinishReason
    withheld: bool


def final_answer(result: GenerationResult, abstain_message: str) -> Answer:
    """The answer a non-streamed response carries: an abstention withholds the text."""
    if result.decision is Decision.ABSTAIN:
        return Answer(abstain_message, "content_filter", withheld=True)
    return Answer(result.text, finish_reason(result), withheld=False)


def finish_reason(result: GenerationResult) -> FinishReason:
    """OpenAI's finish reason (a cancelled answer had stopped, as far as anyone reads it)."""
    return "stop" if result.finish_reason == "cancelled" else result.finish_reason


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


# --- the guard object -------------------------------------------------------------------


def _probe(info: GuardInfo) -> ProbeRef | None:
    if info.probe_name is None:
        return None
    return ProbeRef(name=info.probe_name, sha256=info.probe_sha256)


def _thresholds(info: GuardInfo) -> Thresholds | None:
    return Thresholds.model_validate(info.thresholds) if info.thresholds is not None else None


def scope_score(scope: ScopeVerdict | None) -> ScopeScore | None:
    return None if scope is None else ScopeScore(in_scope=scope.in_scope, score=scope.score)


def span_score(span: SpanRisk) -> SpanScore:
    return SpanScore(start=span.start, end=span.end, risk=span.risk)


def riskiest_score(span: SpanRisk | None) -> SpanScore | None:
    return None if span is None else span_score(span)


def token_score(token: TokenRisk, *, withheld: bool = False) -> TokenScore:
    """One token with its risk; ``withheld``: without its text."""
    return TokenScore(text=None if withheld else token.text, risk=token.risk)


def guard_object(
    result: ScoreResult, *, withheld: bool = False, with_tokens: bool = True
) -> GuardObject:
    """The verdict on a whole answer; ``withheld`` drops every token's text."""
    tokens = result.tokens if with_tokens else []
    return GuardObject(
        risk=result.risk,
        tokens=[token_score(token, withheld=withheld) for token in tokens],
        scope=scope_score(result.scope),
        prompt_risk=result.prompt_risk,
        riskiest_span=riskiest_score(result.riskiest_span),
        guarded=result.info.guarded,
        decision=result.decision,
        aborted=result.aborted,
        withheld=withheld,
        layers={str(layer): share for layer, share in result.layers.items()},
        spans=[span_score(span) for span in result.spans],
        probe=_probe(result.info),
        thresholds=_thresholds(result.info),
    )


def running_guard(event: TokenEvent | None, prompt: PromptVerdicts, guarded: bool) -> RunningGuard:
    """A non-final chunk's guard: the risk so far, the chunk's token (None: no token) and
    the prompt's verdicts."""
    tokens = [] if event is None else [token_score(event.token)]
    return RunningGuard(
        risk=None if event is None else event.running_risk,
        tokens=tokens,
        scope=scope_score(prompt.scope),
        prompt_risk=prompt.prompt_risk,
        riskiest_span=None if event is None else riskiest_score(event.riskiest_span),
        guarded=guarded,
    )


def guard_headers(result: ScoreResult, request_id: str) -> dict[str, str]:
    """The response headers of a non-streamed answer or score (never the answer's text)."""
    return {
        "X-Guard-Risk": "none" if result.risk is None else f"{result.risk:.6f}",
        "X-Guard-Decision": result.decision.value,
        "X-Request-ID": request_id,
    }


# --- whole responses --------------------------------------------------------------------


def completion(
    env: Envelope, result: GenerationResult, abstain_message: str
) -> ChatCompletion | TextCompletion:
    """A non-streamed completion; an abstained answer is withheld (`final_answer`)."""
    answer = final_answer(result, abstain_message)
    common: dict[str, Any] = {
        "id": env.id, "created": env.created, "model": env.model,
        "usage": usage(result.prompt_tokens, result.completion_tokens),
        "guard": guard_object(result, withheld=answer.withheld),
    }  # fmt: skip
    if env.kind == "chat":
        message = ChatMessageOut(content=answer.text)
        return ChatCompletion(
            choices=[ChatChoice(message=message, finish_reason=answer.finish_reason)], **common
        )
    choice = TextChoice(text=answer.text, finish_reason=answer.finish_reason)
    return TextCompletion(choices=[choice], **common)


def score_response(
    request_id: str, model: str, created: int, result: ScoreResult, prompt_tokens: int
) -> ScoreResponse:
    """The score of a client's answer: never withheld, the text is the client's own."""
    return ScoreResponse(
        id=f"score-{request_id}", created=created, model=model, guard=guard_object(result),
        usage=usage(prompt_tokens, len(result.tokens)),
    )  # fmt: skip


# --- stream chunks ----------------------------------------------------------------------


def _chunk(
    env: Envelope,
    text: str | None,
    finish: FinishReason | None,
    guard: GuardObject | RunningGuard | None,
    *,
    role: bool = False,
) -> Chunk:
    common: dict[str, Any] = {"id": env.id, "created": env.created, "model": env.model}
    if env.kind == "chat":
        delta = ChatDelta(role="assistant" if role else None, content=text)
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(choices=[choice], guard=guard, **common)
    text_choice = TextChoice(text=text or "", finish_reason=finish)
    return TextCompletionChunk(choices=[text_choice], guard=guard, **common)


def role_chunk(env: Envelope, prompt: PromptVerdicts, guarded: bool) -> Chunk:
    """A chat stream's first chunk: the role, and whether the answer will be judged."""
    return _chunk(env, "", None, running_guard(None, prompt, guarded), role=True)


def token_chunk(env: Envelope, event: TokenEvent, guarded: bool) -> Chunk:
    return _chunk(env, event.delta, None, running_guard(event, event, guarded))


def verdict_chunk(env: Envelope, result: GenerationResult) -> Chunk:
    """The last chunk with a choice: text held back for stop strings, and the verdict."""
    verdict = guard_object(result, with_tokens=False)
    return _chunk(env, result.trailing, finish_reason(result), verdict)


def usage_chunk(env: Envelope, result: GenerationResult) -> Chunk:
    """After the verdict, with ``stream_options.include_usage``: no choices, the usage."""
    total = usage(result.prompt_tokens, result.completion_tokens)
    common: dict[str, Any] = {"id": env.id, "created": env.created, "model": env.model}
    if env.kind == "chat":
        return ChatCompletionChunk(choices=[], usage=total, **common)
    return TextCompletionChunk(choices=[], usage=total, **common)


def sse(body: BaseModel) -> str:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {body.model_dump_json()}\n\n"
