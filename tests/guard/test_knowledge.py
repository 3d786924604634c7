"""The knowledge gate: the residual state it reads, the artifact round trip, one prompt risk
whichever path computes it, and the policy it drives (flag or abstain on the prompt alone,
abstention before generating, never out of scope)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guard.decoding import GenerationRequest, SamplingParams
from guard.errors import ProbeError, ProbeIntegrityError, ProbeModelMismatchError
from guard.generation import CollectingSink, GuardedModel
from guard.knowledge import KnowledgeGate, ResidualCapture
from guard.model import LoadedModel
from guard.policy import Decision, Policy
from guard.probe import FORMAT_VERSION, KNOWLEDGE_FILE, SCOPE_FILE, load_probe
from guard.results import ScopeVerdict
from guard.scope import FinalHiddenCapture
from probes.knowledge import fit_knowledge_gate, line_for, residual_states
from tests.fixtures.models import ARCHITECTURES, tiny_loaded, tiny_model
from tests.fixtures.probes import guarded_with, write_probe

QUESTION = [{"role": "user", "content": "Who founded the Drevhaus Instruments company?"}]
OTHER = [{"role": "user", "content": "What is the capital of France, and why is it Paris?"}]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded()


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("capture", ["final hidden state", "residual stream"])
def test_position_captures_read_their_state(kind: str, capture: str) -> None:
    """The scope gate's input (the LM head's input) and the knowledge gate's (the stream
    after decoder layer 0), last position or any, against ``output_hidden_states``."""
    model = tiny_model(kind)
    ids = torch.randint(0, 90, (2, 6))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    final = capture == "final hidden state"
    expected = states[-1] if final else states[1]
    hooks = FinalHiddenCapture(model) if final else ResidualCapture(model, 0)
    with torch.no_grad(), hooks as state:
        model(ids)
        torch.testing.assert_close(state.take(), expected[:, -1])
        model(ids)
        torch.testing.assert_close(state.take(torch.tensor([2, 4])), expected[[0, 1], [2, 4]])
    assert model.get_output_embeddings()._forward_pre_hooks == {}
    with pytest.raises(ProbeModelMismatchError, match="decoder layer 5"):
        ResidualCapture(model, 5)


@pytest.mark.parametrize(("gate", "file"), [("scope", SCOPE_FILE), ("knowledge", KNOWLEDGE_FILE)])
def test_gate_artifact_round_trip_and_refusals(
    loaded: LoadedModel, tmp_path: Path, gate: str, file: str
) -> None:
    """Either gate's weights: written with their recipe (the current format), refused when
    tampered with or when the manifest does not list them."""
    directory = write_probe(tmp_path / "probe", loaded, **{f"{gate}_bias": 1.5})
    probe = load_probe(directory)
    assert probe.manifest.format_version == FORMAT_VERSION and file in probe.manifest.files
    assert getattr(probe.manifest, gate) is not None and getattr(probe, gate).bias == 1.5
    data = dict(np.load(directory / file))
    np.savez(directory / file, weights=data["weights"] * 2, bias=data["bias"])
    with pytest.raises(ProbeIntegrityError, match=file):
        load_probe(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["files"][file]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProbeError, match=f"does not list {file}"):
        load_probe(directory)
    plain = load_probe(write_probe(tmp_path / "plain", loaded))
    assert plain.knowledge is None and KnowledgeGate.from_probe(plain, 32) is None


def test_gate_for_another_hidden_size_is_refused(loaded: LoadedModel, tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path / "probe", loaded, knowledge_bias=0.0))
    with pytest.raises(ProbeModelMismatchError, match="knowledge gate reads"):
        KnowledgeGate.from_probe(probe, 999)


def _offline_risks(
    loaded: LoadedModel, gate: KnowledgeGate, prompts: list[list[int]]
) -> list[float]:
    """The gate's prompt risks, one unpadded prompt at a time (the block's output is the
    residual stream: `test_position_captures_read_their_state`): the last token's state's,
    or the max of the token logits over every position."""
    risks = []
    for prompt in prompts:
        with torch.no_grad(), ResidualCapture(loaded.model, gate.layer) as residual:
            loaded.model(torch.tensor([prompt]))
            logits = gate.logits(residual.take_all()[0])  # [seq]
        risks.append(float(torch.sigmoid(logits.max() if gate.pooled else logits[-1])))
    return risks


@pytest.mark.parametrize("feature", ["residual_last_prompt_token", "residual_max_prompt_token"])
def test_prompt_risk_is_the_same_while_generating_scoring_and_offline(
    loaded: LoadedModel, tmp_path: Path, feature: str
) -> None:
    guarded = guarded_with(
        loaded, tmp_path / "probe", knowledge_bias=0.0, knowledge_feature=feature, flag=1.0,
        abstain=1.0,
    )  # fmt: skip
    gate = guarded.knowledge_gate
    assert gate is not None and gate.pooled == (feature == "residual_max_prompt_token")
    prompt, other = guarded.encode_chat(QUESTION), guarded.encode_chat(OTHER)
    assert len(prompt) != len(other)  # the batch pads one of them
    params = SamplingParams(max_tokens=4, temperature=0.0)
    alone = guarded.generate(prompt, params)
    sinks = [CollectingSink(), CollectingSink()]
    guarded.generate_batch(
        [GenerationRequest(p, params, k) for p, k in zip((other, prompt), sinks, strict=True)]
    )
    batch = [sink.result for sink in sinks]
    assert batch[0] is not None and batch[1] is not None
    scored = guarded.score_ids(prompt, alone.token_ids)
    expected_other, expected = _offline_risks(loaded, gate, [other, prompt])
    if not gate.pooled:  # the fitting code's reader, too
        offline = residual_states(loaded, [other, prompt], gate.layer)
        assert gate.risks(torch.as_tensor(offline)) == pytest.approx([expected_other, expected])
    if gate.pooled:  # the max sits in the question, not the template both end with
        assert expected != pytest.approx(expected_other, abs=1e-3)
    assert alone.prompt_risk is not None and 0.0 < alone.prompt_risk < 1.0
    for risk in (batch[1].prompt_risk, scored.prompt_risk):
        assert risk == pytest.approx(alone.prompt_risk, abs=1e-4)
    assert expected == pytest.approx(alone.prompt_risk, abs=1e-4)
    assert batch[0].prompt_risk == pytest.approx(expected_other, abs=1e-4)


def test_policy_takes_the_stricter_of_answer_and_prompt() -> None:
    policy = Policy(0.5, 0.8, prompt_flag=0.6, prompt_abstain=0.9, abstain_before_generation=True)
    assert policy.decide(0.1, prompt_risk=0.1) is Decision.PASS
    assert policy.decide(0.1, prompt_risk=0.7) is Decision.FLAG
    assert policy.decide(0.6, prompt_risk=0.95) is Decision.ABSTAIN
    assert policy.decide(0.85, prompt_risk=0.1) is Decision.ABSTAIN
    assert policy.decide(0.1) is Decision.PASS  # no prompt risk: the answer alone
    out = ScopeVerdict(in_scope=False, score=0.1)
    assert policy.decide(0.1, prompt_risk=0.99, scope=out) is Decision.PASS
    assert policy.abstains_before(0.95, None) and not policy.abstains_before(0.85, None)
    assert not policy.abstains_before(0.99, out)
    assert not Policy(0.5, 0.8, prompt_flag=0.6, prompt_abstain=0.9).abstains_before(0.99, None)
    assert policy.thresholds() == {
        "flag": 0.5, "abstain": 0.8, "prompt_flag": 0.6, "prompt_abstain": 0.9,
    }  # fmt: skip
    with pytest.raises(Exception, match="prompt abstain threshold"):
        Policy(0.5, 0.8, prompt_flag=0.9, prompt_abstain=0.6)


def test_abstains_before_generating_or_after_when_asked(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    """A prompt risk near 1: unanswered (no tokens) with the setting on; answered and then
    abstained with it off; answered and passed out of scope."""
    directory = write_probe(tmp_path / "probe", loaded, flag=1.0, abstain=1.0, knowledge_bias=50.0)
    probe = load_probe(directory)
    early = GuardedModel(loaded, probe, policy=_policy(probe, before=True))
    late = GuardedModel(loaded, probe, policy=_policy(probe, before=False))
    prompt = early.encode_chat(QUESTION)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    skipped, answered = early.generate(prompt, params), late.generate(prompt, params)
    assert skipped.before_generation and skipped.decision is Decision.ABSTAIN
    assert skipped.completion_tokens == 0 and skipped.text == "" and skipped.risk is None
    assert skipped.finish_reason == "content_filter" and skipped.prompt_risk == pytest.approx(1.0)
    assert not answered.before_generation and answered.completion_tokens == 5
    assert answered.decision is Decision.ABSTAIN
    gated = write_probe(
        tmp_path / "gated", loaded, flag=1.0, abstain=1.0, knowledge_bias=50.0, scope_bias=-50.0
    )
    outside = GuardedModel(loaded, load_probe(gated), policy=_policy(load_probe(gated), True))
    result = outside.generate(prompt, params)
    assert result.completion_tokens == 5 and result.decision is Decision.PASS


def _policy(probe: object, before: bool) -> Policy:
    from guard.generation import policy_for
    from guard.settings import GuardSettings

    settings = GuardSettings(knowledge_gate=True, abstain_before_generation=before)
    return policy_for(probe, settings)  # type: ignore[arg-type]


def test_fit_puts_its_lines_where_the_checks_allow() -> None:
    rng = np.random.default_rng(0)
    known, made_up = rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (300, 8)) + 1.5
    x, y = np.concatenate([known, made_up]), np.repeat([0, 1], 300)
    val = rng.normal(0, 1, (200, 8))
    recipe, weights = fit_knowledge_gate(
        x, y, layer=3, c=1.0,
        flag_checks={"known": (val, 0.08)}, abstain_checks={"known": (val, 0.02)},
    )  # fmt: skip
    z = val @ weights.weights + weights.bias
    p = 1 / (1 + np.exp(-z))
    assert np.mean(p >= recipe.flag) <= 0.08 and np.mean(p >= recipe.abstain) <= 0.02
    assert recipe.abstain >= recipe.flag and recipe.layer == 3 and recipe.hidden_size == 8
    made = 1 / (1 + np.exp(-(rng.normal(0, 1, (200, 8)) + 1.5) @ weights.weights - weights.bias))
    assert np.mean(made >= recipe.flag) > 0.5  # the gate separates what it was fitted on
    assert line_for([(np.arange(10.0), 0.2)]) == pytest.approx(7.5)
    assert line_for([(np.arange(10.0), 0.0)]) == pytest.approx(10.0)
    assert line_for([(np.array([1.0, 2.0, 2.0, 2.0, 3.0]), 0.5)]) == pytest.approx(2.5)


def test_the_wordings_differ_only_around_the_prompt() -> None:
    """`render`'s four wordings keep the prompt as typed; an unknown one is refused."""
    from probes.knowledge import RENDERINGS, SYSTEM_MESSAGE, render

    prompt = "Who founded the city of Quessaria?"
    asked = {style: render(prompt, style) for style in RENDERINGS}
    assert asked["plain"] == [{"role": "user", "content": prompt}]
    assert asked["system"] == [{"role": "system", "content": SYSTEM_MESSAGE}, *asked["plain"]]
    for style in ("short_instruction", "long_instruction"):
        user = asked[style][-1]["content"]
        assert user.startswith(prompt) and len(user) > len(prompt)
    assert asked["short_instruction"] != asked["long_instruction"]
    with pytest.raises(ValueError, match="unknown rendering"):
        render(prompt, "shouted")


def test_the_shipped_gate_on_the_readmes_example(smollm2: LoadedModel) -> None:
    """The README's example, on the real model and the shipped probe with the gate acting:
    a treaty that does not exist is abstained on before a token is generated, a famous one
    is answered with a prompt risk far below the flag line."""
    probe = load_probe("default")
    guarded = GuardedModel(smollm2, probe, policy=_policy(probe, before=True))
    policy = guarded.policy
    assert policy.prompt_flag is not None and policy.prompt_abstain is not None
    params = SamplingParams(max_tokens=4, temperature=0.0)
    made_up = guarded.generate(
        guarded.encode_chat([{"role": "user", "content": "Tell me about the Treaty of Vellmark."}]),
        params,
    )
    assert made_up.prompt_risk is not None and made_up.prompt_risk >= policy.prompt_abstain
    assert made_up.before_generation and made_up.completion_tokens == 0
    real = guarded.generate(
        guarded.encode_chat(
            [{"role": "user", "content": "Tell me about the Treaty of Versailles."}]
        ),
        params,
    )
    assert real.prompt_risk is not None and real.prompt_risk < 0.1 < policy.prompt_flag
    assert not real.before_generation and real.completion_tokens == 4
