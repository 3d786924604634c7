"""Guarded generation: per-token risk as produced, batching invariance, scoring equality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from guard.decoding import GenerationRequest, SamplingParams, TextTracker, TokenEvent
from guard.errors import InvalidRequestError, ProbeModelMismatchError
from guard.generation import GuardedModel
from guard.model import LoadedModel
from guard.policy import Decision
from guard.probe import load_probe
from tests.fixtures.models import byte_tokenizer, tiny_loaded
from tests.fixtures.probes import write_probe
from tests.guard.sinks import Sink

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
QUESTIONS = ["What is the capital of France?", "Hi", "Name a large river in South America, please."]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture(scope="module")
def guarded(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> GuardedModel:
    probe_dir = write_probe(tmp_path_factory.mktemp("probe"), tiny)
    return GuardedModel(tiny, load_probe(probe_dir))


def _prompt(guarded: GuardedModel, question: str) -> list[int]:
    return guarded.encode_chat([{"role": "user", "content": question}])


def test_generation_scores_every_token_and_decides(guarded: GuardedModel) -> None:
    events: list[TokenEvent] = []
    result = guarded.generate(_prompt(guarded, QUESTIONS[0]), GREEDY, events.append)
    assert result.finish_reason == "length" and result.completion_tokens == 12
    assert len(events) == 12 and all(e.token.risk is not None for e in events)
    assert result.risk == pytest.approx(events[-1].running_risk)
    assert result.decision is guarded.policy.decide(result.risk)
    assert sum(abs(v) for v in result.layers.values()) == pytest.approx(1.0)
    assert result.info.guarded and result.info.probe_name == "tiny-probe"
    assert [t.token_id for t in result.tokens] == [e.token.token_id for e in events]


def test_teacher_forced_score_equals_generated_risk(guarded: GuardedModel) -> None:
    for question in QUESTIONS:
        prompt = _prompt(guarded, question)
        generated = guarded.generate(prompt, GREEDY)
        scored = guarded.score_ids(prompt, generated.token_ids)
        assert scored.risk == pytest.approx(generated.risk, abs=1e-4)
        np.testing.assert_allclose(scored.token_risks, generated.token_risks, atol=1e-4)
        for layer, share in generated.layers.items():
            assert scored.layers[layer] == pytest.approx(share, abs=1e-4)


def test_risks_are_the_same_alone_or_in_a_batch(guarded: GuardedModel) -> None:
    prompts = [_prompt(guarded, q) for q in QUESTIONS]
    alone = [guarded.generate(p, GREEDY) for p in prompts]
    sinks = [Sink() for _ in prompts]
    guarded.generate_batch(
        [GenerationRequest(p, GREEDY, s) for p, s in zip(prompts, sinks, strict=True)]
    )
    for single, sink in zip(alone, sinks, strict=True):
        assert sink.result is not None
        assert sink.result.token_ids == single.token_ids
        assert sink.result.risk == pytest.approx(single.risk, abs=1e-4)
        np.testing.assert_allclose(sink.result.token_risks, single.token_risks, atol=1e-4)


def test_rows_of_different_lengths_leave_the_batch(guarded: GuardedModel) -> None:
    prompts = [_prompt(guarded, q) for q in QUESTIONS]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (2, 9, 5)]
    sinks = [Sink() for _ in prompts]
    guarded.generate_batch(
        [GenerationRequest(*a) for a in zip(prompts, params, sinks, strict=True)]
    )
    assert [s.result.completion_tokens for s in sinks if s.result] == [2, 9, 5]
    alone = guarded.generate(prompts[1], params[1])
    assert sinks[1].result is not None and sinks[1].result.risk == pytest.approx(alone.risk)


def test_seeded_sampling_is_reproducible(guarded: GuardedModel) -> None:
    prompt = _prompt(guarded, QUESTIONS[0])
    params = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    first, second = guarded.generate(prompt, params), guarded.generate(prompt, params)
    assert first.token_ids == second.token_ids
    other = guarded.generate(prompt, SamplingParams(max_tokens=10, temperature=1.5, seed=8))
    assert other.token_ids != first.token_ids


def test_stop_string_cuts_the_text(guarded: GuardedModel) -> None:
    prompt = _prompt(guarded, QUESTIONS[0])
    full = guarded.generate(prompt, GREEDY)
    stop = full.text[3:5]
    assert stop and full.text.find(stop) == 3
    events: list[TokenEvent] = []
    cut = guarded.generate(prompt, SamplingParams(12, 0.0, stop=(stop,)), events.append)
    assert cut.finish_reason == "stop" and cut.text == full.text[:3]
    assert "".join(e.delta for e in events) + cut.trailing == cut.text
    assert cut.completion_tokens < 12


def test_text_tracker_holds_back_possible_stop_prefixes() -> None:
    tokenizer = byte_tokenizer()
    tracker = TextTracker(tokenizer, ["XYZ"])
    deltas = [tracker.push(i) for i in tokenizer("abXY", add_special_tokens=False)["input_ids"]]
    assert "".join(deltas) == "ab" and tracker.flush() == "XY"
    tracker = TextTracker(tokenizer, ["XYZ"])
    ids = tokenizer("abXYZcd", add_special_tokens=False)["input_ids"]
    deltas = [tracker.push(i) for i in ids[:5]]
    assert tracker.stopped and "".join(deltas) == "ab" and tracker.text == "ab"


def test_abort_stops_a_risky_stream(tiny: LoadedModel, tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, tiny, abort=0.01, abort_min_tokens=3))
    guarded = GuardedModel(tiny, probe)
    prompt = _prompt(guarded, QUESTIONS[0])
    result = guarded.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, abort=True))
    assert result.aborted and result.finish_reason == "content_filter"
    assert result.decision is Decision.ABSTAIN and result.completion_tokens == 3
    assert not guarded.generate(prompt, GREEDY).aborted  # abort only where asked (streams)


def test_cancelled_rows_stop_at_once(guarded: GuardedModel) -> None:
    prompts = [_prompt(guarded, q) for q in QUESTIONS[:2]]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    gone, staying = Sink(cancel_after=2), Sink()
    guarded.generate_batch([GenerationRequest(prompts[0], params, gone),
                            GenerationRequest(prompts[1], params, staying)])  # fmt: skip
    assert gone.result is not None and gone.result.finish_reason == "cancelled"
    assert len(gone.events) == 2
    assert staying.result is not None and staying.result.completion_tokens == 40


def test_end_token_is_not_a_response_token(tiny: LoadedModel, tmp_path: Path) -> None:
    guarded = GuardedModel(tiny, load_probe(write_probe(tmp_path, tiny)))
    end_id = next(iter(guarded.end_ids))
    model = tiny.model
    bias = torch.zeros(model.config.vocab_size)
    bias[end_id] = 1e4  # the end token wins from the third forward pass on
    calls = {"n": 0}

    def push_end(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output + bias if calls["n"] >= 3 else output

    handle = model.lm_head.register_forward_hook(push_end)
    try:
        result = guarded.generate(_prompt(guarded, "Hi"), GREEDY)
    finally:
        handle.remove()
    assert result.finish_reason == "stop" and result.completion_tokens == 2
    assert end_id not in result.token_ids
    scored = guarded.score_ids(_prompt(guarded, "Hi"), result.token_ids)
    assert scored.risk == pytest.approx(result.risk, abs=1e-4)


def test_unguarded_generation_has_no_risk(tiny: LoadedModel) -> None:
    guarded = GuardedModel(tiny, None)
    result = guarded.generate(_prompt(guarded, "Hi"), GREEDY)
    assert result.risk is None and result.decision is Decision.PASS
    assert not result.info.guarded
    assert guarded.score_ids(_prompt(guarded, "Hi"), result.token_ids).risk is None


def test_probe_for_another_model_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    other = tiny_loaded(seed=1)
    probe = load_probe(write_probe(tmp_path, other))
    with pytest.raises(ProbeModelMismatchError):
        GuardedModel(tiny, probe)


def test_invalid_requests(guarded: GuardedModel) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="answer is empty"):
        guarded.score_ids([1, 2], [])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        guarded.score(answer="x")


def test_capture_is_released_even_when_a_sink_fails(guarded: GuardedModel) -> None:
    class Boom(RuntimeError):
        pass

    def explode(event: TokenEvent) -> None:
        raise Boom("client handler failed")

    with pytest.raises(Boom):
        guarded.generate(_prompt(guarded, "Hi"), GREEDY, explode)
    # the hooks and the capture slot were released: a new generation works and agrees
    first = guarded.generate(_prompt(guarded, "Hi"), GREEDY)
    assert first.risk == pytest.approx(guarded.generate(_prompt(guarded, "Hi"), GREEDY).risk)


@pytest.mark.slow
def test_real_model_generation_matches_scoring_and_batching(smol_guarded: GuardedModel) -> None:
    questions = ["What is the capital of France?", "Who wrote Hamlet?"]
    ask = smol_guarded.prompt_recipe.messages
    prompts = [smol_guarded.encode_chat(ask(q)) for q in questions]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    alone = [smol_guarded.generate(p, params) for p in prompts]
    assert "paris" in alone[0].text.lower()
    sinks = [Sink() for _ in prompts]
    smol_guarded.generate_batch(
        [GenerationRequest(p, params, s) for p, s in zip(prompts, sinks, strict=True)]
    )
    for prompt, single, sink in zip(prompts, alone, sinks, strict=True):
        assert sink.result is not None and sink.result.token_ids == single.token_ids
        assert sink.result.risk == pytest.approx(single.risk, abs=1e-4)
        scored = smol_guarded.score_ids(prompt, single.token_ids)
        assert scored.risk == pytest.approx(single.risk, abs=1e-4)
        np.testing.assert_allclose(scored.token_risks, single.token_risks, atol=1e-4)
    by_text = smol_guarded.score(question=questions[0], answer=alone[0].text)
    assert by_text.risk is not None and 0.0 <= by_text.risk <= 1.0
