"""Continuous batching: a request's tokens, risks, scope and decision do not depend on when it
joined the running batch, on who else is in it, or on when the others leave; long prompts are
prefilled in bounded chunks while the running rows keep decoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from guard.decoding import GenerationRequest, SamplingParams
from guard.errors import InvalidRequestError
from guard.generation import GuardedModel
from guard.model import LoadedModel, fingerprint_model
from guard.probe import load_probe
from guard.results import GenerationResult
from tests.fixtures.models import ARCHITECTURES, VOCAB, byte_tokenizer, tiny_loaded, tiny_model
from tests.fixtures.probes import write_probe
from tests.guard.sinks import Sink

MAX = 6  # tokens of the request the others join or leave
RNG = np.random.default_rng(3)


def _ids(n: int) -> list[int]:
    return [int(i) for i in RNG.integers(3, VOCAB, n)]  # ids valid in every tiny model


# Prompts 0 and 2 share 10 leading tokens (a system prompt), prompt 3 shares 6 of them,
# prompt 1 none (it starts with a token the others never use): a request joins with the
# keys and values of an earlier prompt's shared part, or without.
COMMON = _ids(10)
PROMPTS = [COMMON + _ids(5), [2, *_ids(16)], COMMON + _ids(3), COMMON[:6] + _ids(5)]


def _guarded(kind: str, directory: Path, **probe: object) -> GuardedModel:
    """A tiny random model of ``kind`` with the byte tokenizer and a probe on both layers.

    No end token within the model's vocabulary: every answer runs to ``max_tokens``, so the
    test chooses when rows leave. A sharpened head keeps greedy choices off near-ties."""
    model = tiny_model(kind)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # padding must embed
    loaded = LoadedModel(model, tokenizer, fingerprint_model(model), f"tiny-{kind}", "tiny")
    # gates: mixed scope verdicts; a knowledge gate pooled over every prompt token, so
    # that chunks and reused prefixes must give it every token
    settings = {
        "scope_bias": 0.0, "knowledge_bias": 0.0,
        "knowledge_feature": "residual_max_prompt_token", **probe,
    }  # fmt: skip
    path = write_probe(directory, loaded, **settings)  # type: ignore[arg-type]
    return GuardedModel(loaded, load_probe(path))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def guarded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GuardedModel:
    return _guarded(request.param, tmp_path_factory.mktemp(f"probe-{request.param}"))


def _run(
    guarded: GuardedModel,
    schedule: Mapping[int, Sequence[GenerationRequest]],
    prefill_tokens: int | None = 512,
) -> int:
    """Add ``schedule[k]`` to a running batch before its step ``k``; step until it is empty.
    Returns the number of steps."""
    batch = guarded.live_batch(prefill_tokens=prefill_tokens)
    step = 0
    while batch or step <= max(schedule):
        batch.add(schedule.get(step, []))
        if batch:
            batch.step()
        step += 1
    return step


def assert_same(got: GenerationResult | None, want: GenerationResult) -> None:
    assert got is not None
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason and got.decision is want.decision
    np.testing.assert_allclose(got.token_risks, want.token_risks, atol=1e-4)
    assert got.risk == pytest.approx(want.risk, abs=1e-4)
    for layer, share in want.layers.items():
        assert got.layers[layer] == pytest.approx(share, abs=1e-4)
    assert got.scope is not None and want.scope is not None
    assert got.scope.score == pytest.approx(want.scope.score, abs=1e-4)
    assert got.prompt_risk is not None and want.prompt_risk is not None
    assert got.prompt_risk == pytest.approx(want.prompt_risk, abs=1e-4)


def _request(prompt: int, sink: Sink, max_tokens: int) -> GenerationRequest:
    """Greedy: ``max_tokens`` tokens of ``PROMPTS[prompt]``."""
    return GenerationRequest(PROMPTS[prompt], SamplingParams(max_tokens, 0.0), sink)


@pytest.mark.parametrize("prefill_tokens", [512, 8])
def test_requests_joining_at_every_step_get_what_they_get_alone(
    guarded: GuardedModel, prefill_tokens: int
) -> None:
    """B (a 17-token prompt: chunked at 8 tokens a step) and C (leaves after 2 tokens, its
    prompt starting like A's) join A at every step of its answer, and after it."""
    alone = {
        name: guarded.generate(PROMPTS[p], SamplingParams(max_tokens=n, temperature=0.0))
        for name, p, n in (("a", 0, MAX), ("b", 1, MAX), ("c", 2, 2))
    }
    for k in range(MAX + 2):
        sinks = {name: Sink() for name in alone}
        a = _request(0, sinks["a"], MAX)
        b, c = _request(1, sinks["b"], MAX), _request(2, sinks["c"], 2)
        schedule = {0: [a, b, c]} if k == 0 else {0: [a], k: [b, c]}
        _run(guarded, schedule, prefill_tokens)
        for name, want in alone.items():
            assert_same(sinks[name].result, want)


def test_rows_leaving_at_every_step_change_nothing_for_the_others(guarded: GuardedModel) -> None:
    """B finishes after m tokens (m = 1 .. MAX + 1) or is cancelled after m tokens
    (m = 0 .. MAX), joining A at its start or mid-answer."""
    a_alone = guarded.generate(PROMPTS[0], SamplingParams(max_tokens=MAX, temperature=0.0))
    b_full = guarded.generate(PROMPTS[3], SamplingParams(max_tokens=MAX + 1, temperature=0.0))
    for joins_at in (0, 2):
        for m in range(MAX + 2):
            a_sink, b_sink, gone = Sink(), Sink(), Sink(cancel_after=m)
            schedule = {0: [_request(0, a_sink, MAX)]}
            schedule.setdefault(joins_at, []).extend(
                [_request(3, b_sink, max(m, 1)), _request(3, gone, MAX + 1)]
            )
            _run(guarded, schedule)
            assert_same(a_sink.result, a_alone)
            assert b_sink.result is not None
            assert b_sink.result.token_ids == b_full.token_ids[: max(m, 1)]
            np.testing.assert_allclose(
                b_sink.result.token_risks, b_full.token_risks[: max(m, 1)], atol=1e-4
            )
            assert gone.result is not None
            assert gone.result.token_ids == b_full.token_ids[: min(m, MAX + 1)]
            assert gone.result.finish_reason == ("cancelled" if m <= MAX else "length")


def test_seeded_sampling_is_the_same_alone_or_joining(guarded: GuardedModel) -> None:
    params = SamplingParams(max_tokens=MAX, temperature=1.0, top_p=0.9, seed=11)
    alone = guarded.generate(PROMPTS[1], params)
    for k in (1, 3):
        joined, other = Sink(), Sink()
        first = GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=MAX, seed=5), other)
        _run(guarded, {0: [first], k: [GenerationRequest(PROMPTS[1], params, joined)]})
        assert_same(joined.result, alone)


def test_aborted_rows_leave_and_the_others_are_unchanged(tmp_path: Path) -> None:
    guarded = _guarded("llama", tmp_path, abort=0.01, abort_min_tokens=3, scope_bias=50.0)
    a_alone = guarded.generate(PROMPTS[0], SamplingParams(max_tokens=MAX, temperature=0.0))
    aborting = SamplingParams(max_tokens=MAX, temperature=0.0, abort=True)
    b_alone = guarded.generate(PROMPTS[1], aborting)
    assert b_alone.aborted and b_alone.completion_tokens == 3
    for k in range(MAX):
        a, b = Sink(), Sink()
        schedule = {0: [_request(0, a, MAX)]}
        schedule.setdefault(k, []).append(GenerationRequest(PROMPTS[1], aborting, b))
        _run(guarded, schedule)
        assert_same(a.result, a_alone)
        assert_same(b.result, b_alone)


def test_a_long_prompt_is_prefilled_in_bounded_chunks_while_the_batch_decodes(
    tmp_path: Path,
) -> None:
    guarded = _guarded("llama", tmp_path)
    long_prompt = [1, *_ids(39)]  # shares nothing with the running request
    inputs = _record_inputs(guarded)
    try:
        running, joining = Sink(), Sink()
        batch = guarded.live_batch(prefill_tokens=16)
        batch.add([_request(0, running, 20)])
        batch.step()
        batch.add([GenerationRequest(long_prompt, SamplingParams(4, 0.0), joining)])
        steps_to_join = 0
        while not joining.events:
            before = len(running.events)
            batch.step()
            steps_to_join += 1
            assert len(running.events) == before + 1  # the running row never waits
    finally:
        inputs.handle.remove()
    assert steps_to_join == 3  # chunks of 16, 16, 8; the last one's step scores token 1
    assert max(inputs) <= 16, inputs
    while batch:
        batch.step()
    alone = guarded.generate(long_prompt, SamplingParams(4, 0.0))
    assert_same(joining.result, alone)


def test_an_idle_batch_prefills_everything_a_busy_one_its_budget(tmp_path: Path) -> None:
    """Budget 16 prompt tokens a step: three prompts of 11-15 tokens need three passes.
    Idle, all three join in the first step; while they decode, three more join one a step
    (no prefix reuse: every prompt is fed whole)."""
    guarded = _guarded("llama", tmp_path)
    for reuse in (True, False):
        batch = guarded.live_batch(prefill_tokens=16, reuse_prefix=reuse)
        first = [Sink() for _ in range(3)]
        batch.add([_request(i, sink, MAX) for i, sink in zip((0, 3, 2), first, strict=True)])
        batch.step()
        assert [len(sink.events) for sink in first] == [1, 1, 1]
    later = [Sink() for _ in range(3)]
    batch.add([_request(i, sink, MAX) for i, sink in zip((0, 3, 2), later, strict=True)])
    joined = []
    for _ in range(3):
        batch.step()
        joined.append(sum(bool(sink.events) for sink in later))
    assert joined == [1, 2, 3]


def test_a_prompt_starting_like_an_earlier_one_feeds_only_the_rest(tmp_path: Path) -> None:
    guarded = _guarded("llama", tmp_path)
    inputs = _record_inputs(guarded)
    try:
        first, second = Sink(), Sink()
        batch = guarded.live_batch()
        batch.add([_request(0, first, MAX)])
        batch.step()
        inputs.clear()
        batch.add([_request(2, second, MAX)])
        batch.step()
        assert inputs == [len(PROMPTS[2]) - len(COMMON), 2]  # its own 3 tokens, then a step
        while batch:
            batch.step()
    finally:
        inputs.handle.remove()
    assert_same(second.result, guarded.generate(PROMPTS[2], SamplingParams(MAX, 0.0)))


class _Inputs(list[int]):
    handle: torch.utils.hooks.RemovableHandle


def _record_inputs(guarded: GuardedModel) -> _Inputs:
    """Every forward pass's input token count (rows x columns), until ``.handle.remove()``."""
    inputs = _Inputs()

    def record(module: torch.nn.Module, args: object, kwargs: dict[str, object]) -> None:
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            inputs.append(ids.numel())

    model = guarded.loaded.model.base_model
    inputs.handle = model.register_forward_pre_hook(record, with_kwargs=True)
    return inputs


def test_fixed_batch_and_live_batch_agree(guarded: GuardedModel) -> None:
    sinks = [Sink() for _ in PROMPTS]
    requests = [_request(i, s, MAX) for i, s in enumerate(sinks)]
    guarded.generate_batch(requests)
    for i, sink in enumerate(sinks):
        assert_same(sink.result, guarded.generate(PROMPTS[i], SamplingParams(MAX, 0.0)))


def test_an_empty_prompt_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        GuardedModel(tiny_loaded(), None).live_batch().add(
            [GenerationRequest([], SamplingParams(), Sink())]
        )


@pytest.mark.slow
def test_real_model_requests_joining_mid_answer_match_alone_and_scoring(
    smol_guarded: GuardedModel,
) -> None:
    """SmolLM2: C and B join while A decodes, their prompts fed 16 tokens a step and started
    from the keys and values of the system prompt they share with A; C leaves after 2
    tokens. Each equals its answer alone and its teacher-forced score."""
    smol = smol_guarded
    ask = smol.prompt_recipe.messages
    questions = ["What is the capital of France?", "Who wrote Hamlet?", "What is 2 + 2?"]
    prompts = [smol.encode_chat(ask(q)) for q in questions]
    lengths = (10, 10, 2)
    alone = [
        smol.generate(p, SamplingParams(n, 0.0)) for p, n in zip(prompts, lengths, strict=True)
    ]
    sinks = [Sink() for _ in prompts]
    requests = [
        GenerationRequest(p, SamplingParams(n, 0.0), s)
        for p, n, s in zip(prompts, lengths, sinks, strict=True)
    ]
    batch = smol.live_batch(prefill_tokens=16)
    for joining in ([requests[0]], [requests[2]], [], [requests[1]]):
        batch.add(joining)
        batch.step()
    while batch:
        batch.step()
    for prompt, sink, want in zip(prompts, sinks, alone, strict=True):
        assert_same(sink.result, want)
        scored = smol.score_ids(prompt, want.token_ids)
        assert scored.risk == pytest.approx(want.risk, abs=1e-4)
        np.testing.assert_allclose(scored.token_risks, want.token_risks, atol=1e-4)


def test_the_tiny_chat_model_joins_too() -> None:
    """The byte-tokenizer Llama the API tests serve (its own end token and pad id)."""
    loaded = tiny_loaded()
    guarded = GuardedModel(loaded, None)
    prompts = [guarded.encode_chat([{"role": "user", "content": q}]) for q in ("Hi", "Go on.")]
    alone = [guarded.generate(p, SamplingParams(8, 0.0)) for p in prompts]
    sinks = [Sink(), Sink()]
    params = SamplingParams(8, 0.0)
    requests = [GenerationRequest(p, params, s) for p, s in zip(prompts, sinks, strict=True)]
    _run(guarded, {0: requests[:1], 2: requests[1:]})
    for sink, want in zip(sinks, alone, strict=True):
        assert sink.result is not None and sink.result.token_ids == want.token_ids
        assert sink.result.risk is None and sink.result.finish_reason == want.finish_reason
