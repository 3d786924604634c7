"""The verdict: pass, flag or abstain on a calibrated risk, and when to abort a stream.

`Policy` is the one object that decides (docs/ARCHITECTURE.md, "Verdict"): its thresholds,
the scope gate's verdict on the prompt and the abort rule. Engines only measure and
report; they ask the policy whether to stop a stream and what the outcome is. One
`Decision` enum is used everywhere (responses, the metrics label, the audit log);
``aborted`` is a separate flag, not a fourth decision.

    policy = Policy.from_probe(probe.manifest.thresholds, settings)
    policy.decide(0.93)                       # Decision.ABSTAIN
    policy.decide(0.93, scope=ScopeVerdict(False, 0.1))   # Decision.PASS: not judged
    policy.should_abort(0.97, 12, scope)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from guard.errors import GuardError
from guard.probe import Thresholds
from guard.results import Decision, ScopeVerdict, judged

T = TypeVar("T")


def _first(setting: T | None, default: T) -> T:
    return default if setting is None else setting


class ThresholdOverrides(Protocol):
    """What `Policy.from_probe` reads from settings (GuardSettings satisfies it)."""

    @property
    def flag_threshold(self) -> float | None: ...
    @property
    def abstain_threshold(self) -> float | None: ...
    @property
    def abort_threshold(self) -> float | None: ...
    @property
    def abort_min_tokens(self) -> int | None: ...


@dataclass(frozen=True)
class Policy:
    """Thresholds on the calibrated risk; ``abort=None`` disables mid-stream aborts."""

    flag: float
    abstain: float
    abort: float | None = None
    abort_min_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("flag", "abstain", "abort"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise GuardError(f"{name} threshold {value} must lie in [0, 1]")
        if self.abstain < self.flag:
            raise GuardError(
                f"abstain threshold {self.abstain} is below the flag threshold {self.flag}"
            )
        if self.abort_min_tokens < 1:
            raise GuardError("abort_min_tokens must be at least 1")

    @classmethod
    def from_probe(
        cls, thresholds: Thresholds, overrides: ThresholdOverrides | None = None
    ) -> Policy:
        """The manifest's thresholds, each replaced by a setting when that is set."""
        if overrides is None:
            return cls(
                thresholds.flag, thresholds.abstain, thresholds.abort, thresholds.abort_min_tokens
            )
        return cls(
            flag=_first(overrides.flag_threshold, thresholds.flag),
            abstain=_first(overrides.abstain_threshold, thresholds.abstain),
            abort=_first(overrides.abort_threshold, thresholds.abort),
            abort_min_tokens=_first(overrides.abort_min_tokens, thresholds.abort_min_tokens),
        )

    def decide(
        self, risk: float | None, *, scope: ScopeVerdict | None = None, aborted: bool = False
    ) -> Decision:
        """The outcome of one answer: ``abstain`` when its stream was aborted or its risk
        reaches the abstain threshold, ``flag`` at or above flag, else ``pass``; always
        ``pass`` unguarded or for a prompt the scope gate puts outside what the probe
        judges (an out-of-scope stream is never aborted: `should_abort`)."""
        if aborted:
            return Decision.ABSTAIN
        if risk is None or not judged(scope):
            return Decision.PASS
        if risk >= self.abstain:
            return Decision.ABSTAIN
        if risk >= self.flag:
            return Decision.FLAG
        return Decision.PASS

    def should_abort(
        self, running_risk: float, tokens: int, scope: ScopeVerdict | None = None
    ) -> bool:
        """Stop a stream once the running risk reaches the abort threshold (after
        ``abort_min_tokens`` tokens, and only for a prompt the policy judges)."""
        return (
            self.abort is not None
            and judged(scope)
            and tokens >= self.abort_min_tokens
            and running_risk >= self.abort
        )

    def thresholds(self) -> dict[str, float]:
        """The thresholds as the ``guard`` object shows them."""
        out = {"flag": self.flag, "abstain": self.abstain}
        if self.abort is not None:
            out["abort"] = self.abort
        return out
