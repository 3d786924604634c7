"""Policy: decisions on the calibrated risk, thresholds from the manifest or settings, abort."""

from __future__ import annotations

import pytest

from guard.errors import GuardError
from guard.policy import Decision, Policy
from guard.probe import KnowledgeRecipe, Thresholds
from guard.results import ScopeVerdict
from guard.settings import GuardSettings


def test_decisions_follow_thresholds() -> None:
    policy = Policy(flag=0.5, abstain=0.8)
    assert policy.decide(0.1) is Decision.PASS
    assert policy.decide(0.5) is Decision.FLAG
    assert policy.decide(0.79) is Decision.FLAG
    assert policy.decide(0.8) is Decision.ABSTAIN
    assert policy.decide(None) is Decision.PASS
    assert [d.value for d in Decision] == ["pass", "flag", "abstain"]


def test_settings_override_manifest_thresholds() -> None:
    thresholds = Thresholds(flag=0.6, abstain=0.9, abort=0.95, abort_min_tokens=4)
    assert Policy.from_probe(thresholds) == Policy(0.6, 0.9, 0.95, 4)
    settings = GuardSettings(flag_threshold=0.3, abort_threshold=0.7)
    policy = Policy.from_probe(thresholds, settings)
    assert (policy.flag, policy.abstain, policy.abort, policy.abort_min_tokens) == (
        0.3, 0.9, 0.7, 4,
    )  # fmt: skip


def test_settings_override_the_knowledge_gate_lines_only_when_it_acts() -> None:
    """GUARD_PROMPT_FLAG/ABSTAIN_THRESHOLD replace the gate's lines; without a gate in force
    (``knowledge`` None: report-only) there are no prompt lines to replace."""
    thresholds = Thresholds(flag=0.6, abstain=0.9)
    gate = KnowledgeRecipe(layer=3, hidden_size=8, flag=0.9, abstain=0.97)
    settings = GuardSettings(prompt_flag_threshold=0.85)
    policy = Policy.from_probe(thresholds, settings, gate)
    assert (policy.prompt_flag, policy.prompt_abstain) == (0.85, 0.97)
    assert policy.decide(0.1, prompt_risk=0.86) is Decision.FLAG
    assert Policy.from_probe(thresholds, GuardSettings(), gate).decide(0.1, prompt_risk=0.86) is (
        Decision.PASS
    )
    reported = Policy.from_probe(thresholds, settings)
    assert (reported.prompt_flag, reported.prompt_abstain) == (None, None)
    assert reported.decide(0.1, prompt_risk=0.99) is Decision.PASS
    with pytest.raises(GuardError, match="prompt abstain threshold 0.97 is below"):
        Policy.from_probe(thresholds, GuardSettings(prompt_flag_threshold=0.99), gate)


def test_abort_needs_threshold_and_min_tokens() -> None:
    assert not Policy(0.5, 0.8).should_abort(1.0, 100)
    policy = Policy(0.5, 0.8, abort=0.9, abort_min_tokens=3)
    assert not policy.should_abort(0.95, 2)
    assert policy.should_abort(0.95, 3)
    assert not policy.should_abort(0.89, 30)
    assert policy.thresholds() == {"flag": 0.5, "abstain": 0.8, "abort": 0.9}


def test_abort_on_sentences_adds_final_sentences_to_the_rule() -> None:
    """A final sentence at the abort line stops a stream only with ``abort_on_sentences``,
    under the same conditions as the running risk (threshold set, min tokens, in scope)."""
    off = Policy(0.5, 0.8, abort=0.9, abort_min_tokens=3)
    on = Policy(0.5, 0.8, abort=0.9, abort_min_tokens=3, abort_on_sentences=True)
    assert not off.should_abort(0.4, 10, sentence_risks=[0.95])
    assert on.should_abort(0.4, 10, sentence_risks=[0.3, 0.95])
    assert not on.should_abort(0.4, 10, sentence_risks=[0.89])
    assert not on.should_abort(0.4, 2, sentence_risks=[0.95])
    assert not on.should_abort(0.4, 10, ScopeVerdict(False, 0.1), sentence_risks=[0.95])
    assert not Policy(0.5, 0.8, abort_on_sentences=True).should_abort(0.4, 10, None, [1.0])
    settings = GuardSettings(abort_on_sentences=True)
    assert Policy.from_probe(Thresholds(flag=0.5, abstain=0.8), settings).abort_on_sentences


def test_inconsistent_thresholds_are_refused() -> None:
    with pytest.raises(GuardError, match="below the flag"):
        Policy(flag=0.9, abstain=0.5)
    with pytest.raises(GuardError, match="must lie in"):
        Policy(flag=0.5, abstain=1.5)
