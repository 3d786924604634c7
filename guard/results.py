"""What guarded generation and scoring return (plain results; their JSON, the ``guard``
object, is built by `guard.api.bodies`).

result = guarded.score(question="Capital of France?", answer="Paris")
result.risk, result.decision, result.tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

FinishReason = Literal["stop", "length", "content_filter", "cancelled"]


class Decision(StrEnum):
    """The verdict on one answer (decided by `guard.policy.Policy`)."""

    PASS = "pass"
    FLAG = "flag"
    ABSTAIN = "abstain"


@dataclass(frozen=True)
class GuardInfo:
    """Who judged: the probe (None when unguarded) and the thresholds in force."""

    probe_name: str | None
    probe_sha256: str | None
    thresholds: dict[str, float] | None = None

    @property
    def guarded(self) -> bool:
        return self.probe_name is not None


@dataclass(frozen=True)
class ScopeVerdict:
    """The scope gate on one prompt: ``score`` = p(short factual question)."""

    in_scope: bool
    score: float


def judged(scope: ScopeVerdict | None) -> bool:
    """Whether the policy judges an answer: no gate, or the gate put its prompt in scope."""
    return scope is None or scope.in_scope


@dataclass(frozen=True)
class TokenRisk:
    """One response token: its id, its own text and its display risk (None unguarded)."""

    token_id: int
    text: str
    risk: float | None


@dataclass(frozen=True)
class SpanRisk:
    """One sentence of an answer: ``[start, end)`` character offsets into the answer text
    and the risk of its tokens alone (`guard.spans`, `RiskScorer.span_risks`)."""

    start: int
    end: int
    risk: float


@dataclass(frozen=True)
class ScoreResult:
    """The verdict on one answer: risk, decision and where the risk came from.

    ``layers``: each probe layer's signed share of the answer's probe logit
    (its mean contribution divided by the sum of the absolute mean contributions).
    ``spans``: the answer's sentences and their risks (empty when unguarded); they show
    where. ``prompt_risk``: the knowledge gate's probability that the prompt asks about
    something the model does not know (None: the probe has no knowledge gate); the
    decision is the stricter of the risk's and the prompt risk's (`guard.policy`).
    """

    info: GuardInfo
    risk: float | None
    decision: Decision
    tokens: list[TokenRisk]
    layers: dict[int, float] = field(default_factory=dict)
    aborted: bool = False
    scope: ScopeVerdict | None = None  # None: the probe has no scope gate (all in scope)
    spans: list[SpanRisk] = field(default_factory=list)
    prompt_risk: float | None = None

    @property
    def in_scope(self) -> bool:
        return judged(self.scope)

    @property
    def riskiest_span(self) -> SpanRisk | None:
        """The sentence with the highest risk (the first of equals); None without spans."""
        return max(self.spans, key=lambda span: span.risk, default=None)

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]

    @property
    def token_risks(self) -> list[float | None]:
        return [token.risk for token in self.tokens]


@dataclass(frozen=True)
class GenerationResult(ScoreResult):
    """A generated answer with its verdict.

    ``text`` is the answer as generated (cut before a stop string), abstained or not:
    the API withholds an abstained answer in one place (`guard.api.bodies.final_answer`).
    ``before_generation``: abstained on the prompt risk alone, nothing was generated.
    """

    text: str = ""
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    trailing: str = ""  # text not yet delivered through token events (held for stop strings)
    before_generation: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)
