"""The scope gate: artifact round trip and refusals, the hidden state it reads, and the
policy it changes (out of scope: risk reported, never flagged, abstained or aborted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.decoding import SamplingParams
from guard.errors import ProbeModelMismatchError
from guard.forcing import prompt_hidden
from guard.generation import GuardedModel
from guard.model import LoadedModel
from guard.policy import Decision
from guard.probe import load_probe
from guard.scope import ScopeGate
from tests.fixtures.models import tiny_loaded
from tests.fixtures.probes import guarded_with, write_probe

QUESTION = [{"role": "user", "content": "Which river flows through Cairo?"}]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded()


def test_format_1_artifact_without_gate_still_loads(loaded: LoadedModel, tmp_path: Path) -> None:
    directory = write_probe(tmp_path / "probe", loaded)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest.pop("scope")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    probe = load_probe(directory)
    assert probe.scope is None
    result = GuardedModel(loaded, probe).score(messages=QUESTION, answer="The Nile")
    assert result.scope is None and result.in_scope


def test_gate_for_another_hidden_size_is_refused(tmp_path: Path) -> None:
    small = tiny_loaded()
    directory = write_probe(tmp_path / "probe", small, scope_bias=0.0)
    manifest = load_probe(directory).manifest
    assert manifest.scope is not None
    wide = manifest.scope.model_copy(update={"hidden_size": 64})
    probe = load_probe(directory)
    broken = type(probe)(
        manifest.model_copy(update={"scope": wide}), probe.weights, probe.path, "", probe.scope
    )
    with pytest.raises(ProbeModelMismatchError, match="64 hidden units"):
        ScopeGate.from_probe(broken, small.model)


def test_out_of_scope_is_reported_but_never_flagged(loaded: LoadedModel, tmp_path: Path) -> None:
    # thresholds at 0: every judged answer abstains; out of scope none may
    out = guarded_with(
        loaded, tmp_path / "out" / "probe", flag=0.0, abstain=0.0, abort=0.0, scope_bias=-50.0
    )
    inside = guarded_with(
        loaded, tmp_path / "in" / "probe", flag=0.0, abstain=0.0, abort=0.0, scope_bias=50.0
    )
    prompt = out.encode_chat(QUESTION)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, abort=True)
    passed = out.generate(prompt, params)
    judged = inside.generate(prompt, params)
    assert passed.scope is not None and not passed.scope.in_scope
    assert passed.decision is Decision.PASS and not passed.aborted
    assert passed.completion_tokens == 6 and passed.risk is not None  # still measured
    assert judged.scope is not None and judged.scope.in_scope
    assert judged.decision is Decision.ABSTAIN and judged.aborted
    assert passed.scope.score == pytest.approx(0.0, abs=1e-9)
    scored = out.score(messages=QUESTION, answer="The Nile")
    assert scored.decision is Decision.PASS and not scored.in_scope


def test_gate_score_is_the_same_while_generating_scoring_and_offline(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    guarded = guarded_with(loaded, tmp_path / "probe", scope_bias=0.0)
    gate = guarded.scope_gate
    assert gate is not None
    prompt = guarded.encode_chat(QUESTION)
    other = guarded.encode_chat([{"role": "user", "content": "Write a haiku about autumn"}])
    generated = guarded.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))
    scored = guarded.score_ids(prompt, generated.token_ids)
    offline = gate.probabilities(prompt_hidden(loaded.model, [other, prompt], 0))[1]
    assert generated.scope is not None and scored.scope is not None
    assert 0.0 < generated.scope.score < 1.0
    assert scored.scope.score == pytest.approx(generated.scope.score, abs=1e-4)
    assert float(offline) == pytest.approx(generated.scope.score, abs=1e-4)


def test_gate_can_be_switched_off(loaded: LoadedModel, tmp_path: Path) -> None:
    directory = write_probe(tmp_path / "probe", loaded, flag=0.0, abstain=0.0, scope_bias=-50.0)
    guarded = GuardedModel(loaded, load_probe(directory), scope_gate=False)
    result = guarded.score(messages=QUESTION, answer="The Nile")
    assert guarded.scope_gate is None and result.scope is None
    assert result.decision is Decision.ABSTAIN


def test_threshold_override(loaded: LoadedModel, tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path / "probe", loaded, scope_bias=0.0))
    default = GuardedModel(loaded, probe).scope_gate
    strict = GuardedModel(loaded, probe, scope_threshold=1.0)
    assert default is not None and default.threshold == 0.5
    assert strict.scope_gate is not None and strict.scope_gate.threshold == 1.0
    assert not strict.score(messages=QUESTION, answer="The Nile").in_scope
