"""The verdict: pass, flag or abstain on a calibrated risk, and when to abort a stream.

`Policy` is the one object that decides (docs/ARCHITECTURE.md, "Verdict"): its thresholds,
the scope gate's verdict on the prompt, the knowledge gate's ``prompt_risk`` and the abort
rule. Engines only measure and report; they ask the policy whether to stop a stream,
whether to answer at all, and what the outcome is. One `Decision` enum is used everywhere
(responses, the metrics label, the audit log); ``aborted`` is a separate flag, not a
fourth decision.

An answer's decision is the stricter of the answer risk's and the prompt risk's (each
against its own thresholds), for prompts the scope gate judges. With
``abstain_before_generation``, a prompt whose risk reaches the prompt abstain threshold
is not answered at all (`abstains_before`): the decision it would end with anyway, without
the generation. With ``abort_on_sentences``, a stream is also stopped as soon as one of
its sentences is final with a risk at the abort threshold (`guard.spans.SentenceStream`):
one invented claim in a long answer need not wait for the whole answer's risk.

    policy = Policy.from_probe(probe.manifest.thresholds, settings, probe.manifest.knowledge)
    policy.decide(0.93)                       # Decision.ABSTAIN
    policy.decide(0.93, scope=ScopeVerdict(False, 0.1))   # Decision.PASS: not judged
    policy.decide(0.2, prompt_risk=0.99)      # the prompt's decision (abstain, say)
    policy.should_abort(0.97, 12, scope)
    policy.should_abort(0.40, 12, scope, sentence_risks=[0.98])   # with abort_on_sentences
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from guard.errors import GuardError
from guard.probe import KnowledgeRecipe, Thresholds
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
    @property
    def prompt_flag_threshold(self) -> float | None: ...
    @property
    def prompt_abstain_threshold(self) -> float | None: ...
    @property
    def knowledge_gate(self) -> bool: ...
    @property
    def abstain_before_generation(self) -> bool: ...
    @property
    def abort_on_sentences(self) -> bool: ...


_SEVERITY = (Decision.PASS, Decision.FLAG, Decision.ABSTAIN)


def _on(risk: float | None, flag: float | None, abstain: float | None) -> Decision:
    """``abstain`` at or above ``abstain``, ``flag`` at or above ``flag``, else ``pass``."""
    if risk is None:
        return Decision.PASS
    if abstain is not None and risk >= abstain:
        return Decision.ABSTAIN
    if flag is not None and risk >= flag:
        return Decision.FLAG
    return Decision.PASS


@dataclass(frozen=True)
class Policy:
    """Thresholds on the calibrated risk; ``abort=None`` disables mid-stream aborts;
    ``prompt_flag``/``prompt_abstain``: thresholds on ``prompt_risk`` (None: no knowledge
    gate); ``abort_on_sentences``: the abort threshold applies to each final sentence's
    risk too, not only to the running risk."""

    flag: float
    abstain: float
    abort: float | None = None
    abort_min_tokens: int = 8
    prompt_flag: float | None = None
    prompt_abstain: float | None = None
    abstain_before_generation: bool = False
    abort_on_sentences: bool = False

    def __post_init__(self) -> None:
        for name in ("flag", "abstain", "abort", "prompt_flag", "prompt_abstain"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise GuardError(f"{name} threshold {value} must lie in [0, 1]")
        if self.abstain < self.flag:
            raise GuardError(
                f"abstain threshold {self.abstain} is below the flag threshold {self.flag}"
            )
        if (
            self.prompt_flag is not None
            and self.prompt_abstain is not None
            and self.prompt_abstain < self.prompt_flag
        ):
            raise GuardError(
                f"prompt abstain threshold {self.prompt_abstain} is below the prompt flag "
                f"threshold {self.prompt_flag}"
            )
        if self.abort_min_tokens < 1:
            raise GuardError("abort_min_tokens must be at least 1")

    @classmethod
    def from_probe(
        cls,
        thresholds: Thresholds,
        overrides: ThresholdOverrides | None = None,
        knowledge: KnowledgeRecipe | None = None,
    ) -> Policy:
        """The manifest's thresholds (and its knowledge gate's, when ``knowledge`` is
        given), each replaced by a setting when that is set."""
        prompt_flag = knowledge.flag if knowledge is not None else None
        prompt_abstain = knowledge.abstain if knowledge is not None else None
        if overrides is None:
            return cls(
                thresholds.flag, thresholds.abstain, thresholds.abort, thresholds.abort_min_tokens,
                prompt_flag, prompt_abstain,
            )  # fmt: skip
        return cls(
            flag=_first(overrides.flag_threshold, thresholds.flag),
            abstain=_first(overrides.abstain_threshold, thresholds.abstain),
            abort=_first(overrides.abort_threshold, thresholds.abort),
            abort_min_tokens=_first(overrides.abort_min_tokens, thresholds.abort_min_tokens),
            prompt_flag=_first(overrides.prompt_flag_threshold, prompt_flag) if knowledge else None,
            prompt_abstain=(
                _first(overrides.prompt_abstain_threshold, prompt_abstain) if knowledge else None
            ),
            abstain_before_generation=overrides.abstain_before_generation,
            abort_on_sentences=overrides.abort_on_sentences,
        )

    def decide(
        self,
        risk: float | None,
        *,
        scope: ScopeVerdict | None = None,
        aborted: bool = False,
        prompt_risk: float | None = None,
    ) -> Decision:
        """The outcome of one answer: ``abstain`` when its stream was aborted, else the
        stricter of its risk's and its prompt risk's decision (``abstain`` at or above the
        abstain threshold, ``flag`` at or above flag, else ``pass``); always ``pass``
        unguarded or for a prompt the scope gate puts outside what the probe judges (an
        out-of-scope stream is never aborted: `should_abort`)."""
        if aborted:
            return Decision.ABSTAIN
        if not judged(scope):
            return Decision.PASS
        answer = _on(risk, self.flag, self.abstain)
        prompt = _on(prompt_risk, self.prompt_flag, self.prompt_abstain)
        return max(answer, prompt, key=_SEVERITY.index)

    def abstains_before(self, prompt_risk: float | None, scope: ScopeVerdict | None) -> bool:
        """Abstain without generating: the prompt risk alone reaches the prompt abstain
        threshold of a judged prompt, and the policy is set to act on it early."""
        return (
            self.abstain_before_generation
            and judged(scope)
            and _on(prompt_risk, self.prompt_flag, self.prompt_abstain) is Decision.ABSTAIN
        )

    def should_abort(
        self,
        running_risk: float,
        tokens: int,
        scope: ScopeVerdict | None = None,
        sentence_risks: Sequence[float] = (),
    ) -> bool:
        """Stop a stream once the running risk reaches the abort threshold, or (with
        ``abort_on_sentences``) the risk of a sentence that just became final does; after
        ``abort_min_tokens`` tokens, and only for a prompt the policy judges."""
        if self.abort is None or not judged(scope) or tokens < self.abort_min_tokens:
            return False
        if running_risk >= self.abort:
            return True
        return self.abort_on_sentences and any(risk >= self.abort for risk in sentence_risks)

    def thresholds(self) -> dict[str, float]:
        """The thresholds as the ``guard`` object shows them."""
        out = {"flag": self.flag, "abstain": self.abstain}
        if self.abort is not None:
            out["abort"] = self.abort
        if self.prompt_flag is not None:
            out["prompt_flag"] = self.prompt_flag
        if self.prompt_abstain is not None:
            out["prompt_abstain"] = self.prompt_abstain
        return out
