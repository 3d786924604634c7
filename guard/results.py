"""What guarded generation and scoring return, and the ``guard`` JSON object built from it.

result = guarded.score(question="Capital of France?", answer="Paris")
result.risk, result.decision, result.guard_object()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

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

    def describe(self) -> dict[str, Any]:
        """The fixed part of every ``guard`` object."""
        probe = {"name": self.probe_name, "sha256": self.probe_sha256} if self.guarded else None
        return {
            "probe": probe,
            "thresholds": self.thresholds if self.guarded else None,
            "guarded": self.guarded,
        }


@dataclass(frozen=True)
class ScopeVerdict:
    """The scope gate on one prompt: ``score`` = p(short factual question)."""

    in_scope: bool
    score: float

    def as_json(self) -> dict[str, Any]:
        return {"in_scope": self.in_scope, "score": self.score}


def judged(scope: ScopeVerdict | None) -> bool:
    """Whether the policy judges an answer: no gate, or the gate put its prompt in scope."""
    return scope is None or scope.in_scope


@dataclass(frozen=True)
class TokenRisk:
    """One response token: its id, its own text and its display risk (None unguarded)."""

    token_id: int
    text: str
    risk: float | None

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "risk": self.risk}


@dataclass(frozen=True)
class ScoreResult:
    """The verdict on one answer: risk, decision and where the risk came from.

    ``layers``: each probe layer's signed share of the answer's probe logit
    (its mean contribution divided by the sum of the absolute mean contributions).
    """

    info: GuardInfo
    risk: float | None
    decision: Decision
    tokens: list[TokenRisk]
    layers: dict[int, float] = field(default_factory=dict)
    aborted: bool = False
    scope: ScopeVerdict | None = None  # None: the probe has no scope gate (all in scope)

    @property
    def in_scope(self) -> bool:
        return judged(self.scope)

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]

    @property
    def token_risks(self) -> list[float | None]:
        return [token.risk for token in self.tokens]

    def headers(self, request_id: str) -> dict[str, str]:
        """The response headers of a non-streamed answer or score."""
        return {
            "X-Guard-Risk": "none" if self.risk is None else f"{self.risk:.6f}",
            "X-Guard-Decision": self.decision.value,
            "X-Request-ID": request_id,
        }

    def guard_object(self, *, include_tokens: bool = True) -> dict[str, Any]:
        """The ``guard`` object of docs/ARCHITECTURE.md for the whole answer."""
        body: dict[str, Any] = {
            "risk": self.risk,
            "decision": self.decision.value,
            "aborted": self.aborted,
        }
        if include_tokens:
            body["tokens"] = [token.as_json() for token in self.tokens]
        body["layers"] = {str(layer): share for layer, share in self.layers.items()}
        body["scope"] = self.scope.as_json() if self.scope is not None else None
        body.update(self.info.describe())
        return body


@dataclass(frozen=True)
class GenerationResult(ScoreResult):
    """A generated answer with its verdict.

    ``text`` is the answer as generated (cut before a stop string); replacing an
    abstained answer with the abstention message is the caller's choice.
    """

    text: str = ""
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    trailing: str = ""  # text not yet delivered through token events (held for stop strings)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)
