"""The vLLM engine against the transformers engine on SmolLM2 with the shipped probe.

One vLLM engine per process layout (vLLM's own processes, then in process), started on
purpose with a small token budget per step (``max_num_batched_tokens=48``, at most 6
sequences): prompts are prefilled in chunks and mixed with other requests' decodes in one
flat batch, so every number below also tests that CETT and logit statistics are attributed
to the right request.

Parity: for the same token ids, per-token risks within 1e-3 and the same decisions.
Greedy answers are token-identical here (float32 on both sides); should a future kernel
change flip a near-tie, the first differing token is reported and risks are compared
only up to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from guard.api.app import create_app
from guard.generation import GuardedModel
from guard.loading import configured
from guard.model import LoadedModel
from guard.probe import load_probe
from guard.results import GenerationResult
from guard.sampling import SamplingParams
from guard.settings import GuardSettings
from tests.fixtures.servers import serve_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "Which planet is known as the Red Planet?",
    "In which year did the Berlin Wall fall?",
    "What is the chemical symbol for gold?",
]
ANSWERS = ["Paris.", "William Shakespeare wrote it.", "Mars", "It fell in 1991.", "Ag"]
TOL = 1e-3


@pytest.fixture(scope="module", params=["multiprocess", "in-process"])
def engines(
    request: pytest.FixtureRequest, smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[object, GuardedModel]]:
    """Each test runs on both process layouts: vLLM's own (engine core and worker in their
    processes, frames over the channel) and vLLM in this process."""
    from guard.vllm_engine import VLLMEngine

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("GUARD_EXPORT_DIR", str(tmp_path_factory.mktemp("export")))
    settings = GuardSettings(
        probe="default", max_batch=6, max_new_tokens=32,
        vllm_multiprocess=request.param == "multiprocess",
    )  # fmt: skip
    engine = VLLMEngine(settings, max_num_batched_tokens=48, enable_chunked_prefill=True)
    reference = configured(smollm2, load_probe("default"), settings)
    engine.start()
    try:
        yield engine, reference
    finally:
        engine.stop(30)
        monkeypatch.undo()


async def _generate(
    engine: object, prompts: list[list[int]], max_tokens: int
) -> list[GenerationResult]:
    async def one(ids: list[int]) -> GenerationResult:
        stream = engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))  # type: ignore[attr-defined]
        async for item in stream.events():
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("stream ended without a result")

    return list(await asyncio.gather(*(one(ids) for ids in prompts)))


def _assert_same_verdict(ours: object, theirs: object) -> None:
    assert ours.decision == theirs.decision  # type: ignore[attr-defined]
    assert ours.risk == pytest.approx(theirs.risk, abs=TOL)  # type: ignore[attr-defined]
    mine, other = ours.scope, theirs.scope  # type: ignore[attr-defined]
    assert (mine is None) == (other is None)
    if mine is not None:
        assert mine.in_scope == other.in_scope and abs(mine.score - other.score) < TOL
    # the shipped probe's knowledge gate: read inside vLLM's forward too
    assert ours.prompt_risk is not None and theirs.prompt_risk is not None  # type: ignore[attr-defined]
    assert ours.prompt_risk == pytest.approx(theirs.prompt_risk, abs=TOL)  # type: ignore[attr-defined]


def test_teacher_forced_risks_match_per_token(engines: tuple[object, GuardedModel]) -> None:
    engine, reference = engines

    async def score_all() -> list[object]:
        jobs = []
        for question, answer in zip(QUESTIONS, ANSWERS, strict=True):
            prompt = engine.encode_question(question)  # type: ignore[attr-defined]
            jobs.append(engine.score(prompt, engine.encode_answer(answer)))  # type: ignore[attr-defined]
        return list(await asyncio.gather(*jobs))

    for question, answer, ours in zip(QUESTIONS, ANSWERS, asyncio.run(score_all()), strict=True):
        prompt = reference.encode_chat(reference.prompt_recipe.messages(question))
        theirs = reference.score_ids(prompt, reference.encode_answer(answer))
        assert ours.token_ids == theirs.token_ids  # type: ignore[attr-defined]
        assert ours.token_risks == pytest.approx(theirs.token_risks, abs=TOL)  # type: ignore[attr-defined]
        _assert_same_verdict(ours, theirs)
        assert ours.layers.keys() == theirs.layers.keys()  # type: ignore[attr-defined]


def test_greedy_answers_and_their_risks_match(engines: tuple[object, GuardedModel]) -> None:
    engine, reference = engines
    prompts = [reference.encode_chat(reference.prompt_recipe.messages(q)) for q in QUESTIONS]
    ours = asyncio.run(_generate(engine, prompts, 16))
    for prompt, mine in zip(prompts, ours, strict=True):
        theirs = reference.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))
        same = next(
            (
                i
                for i, (a, b) in enumerate(zip(mine.token_ids, theirs.token_ids, strict=False))
                if a != b
            ),
            None,
        )
        assert same is None and mine.token_ids == theirs.token_ids, (
            f"greedy answers differ from token {same}: {mine.text!r} vs {theirs.text!r}"
        )
        assert mine.finish_reason == theirs.finish_reason and mine.text == theirs.text
        assert mine.token_risks == pytest.approx(theirs.token_risks, abs=TOL)
        _assert_same_verdict(mine, theirs)
    # the same answers, judged teacher-forced by the transformers engine: the streamed
    # risk of a generated answer is the risk of that answer
    for prompt, mine in zip(prompts, ours, strict=True):
        forced = reference.score_ids(prompt, mine.token_ids)
        assert mine.risk == pytest.approx(forced.risk, abs=TOL)


def _forced_length_prompt(
    reference: GuardedModel, block: int, fills: bool
) -> tuple[list[int], int]:
    """A prompt and an answer length (2-16 tokens) whose last kept token does (``fills``)
    or does not fill its KV block of ``block`` tokens."""
    for pad in range(4 * block):
        question = QUESTIONS[0] + " Thanks." * pad
        prompt = reference.encode_chat(reference.prompt_recipe.messages(question))
        for tokens in range(2, 17):
            # the last kept token sits at position len(prompt) + tokens - 1
            if ((len(prompt) + tokens) % block == 0) == fills:
                return prompt, tokens
    raise AssertionError(f"no prompt fits a block of {block}")


@pytest.mark.parametrize("fills_block", [False, True], ids=["skips", "fills-its-block"])
def test_a_last_step_alone_computes_only_what_the_guard_reads(
    engines: tuple[object, GuardedModel], fills_block: bool
) -> None:
    """A generation's last vLLM step only feeds its last kept token (that step's sample is
    dropped): alone in its step it stops the decoder stack after the last layer the guard
    reads and computes no logits (`TailSkip`), unless that token fills its KV block, which
    vLLM's prefix cache keeps. Either way the answer and its risks are the transformers
    engine's, and so are those of a next turn that continues the conversation (its prompt
    reuses the cached blocks, the last answer token's among them when it filled one). The
    step count is what holds the block rule: with the rule removed, the next turn's risks
    still matched within the tolerance here (one slot of a reused block)."""
    engine, reference = engines
    block = engine.llm.vllm_config.cache_config.block_size  # type: ignore[attr-defined]
    prompt, tokens = _forced_length_prompt(reference, block, fills_block)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(ids: list[int]) -> GenerationResult:
        async for item in engine.submit(ids, params).events():  # type: ignore[attr-defined]
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("stream ended without a result")

    frames = engine.frames  # type: ignore[attr-defined]
    before = frames.tail_steps
    mine = asyncio.run(one(prompt))
    assert frames.tail_steps - before == (0 if fills_block else 1)
    theirs = reference.generate(prompt, params)
    assert mine.token_ids == theirs.token_ids and len(mine.token_ids) == tokens
    assert mine.token_risks == pytest.approx(theirs.token_risks, abs=TOL)
    _assert_same_verdict(mine, theirs)
    turn = [*prompt, *mine.token_ids, *reference.encode_answer(" Thanks, and why?")]
    ours, expected = asyncio.run(one(turn)), reference.generate(turn, params)
    assert ours.token_ids == expected.token_ids
    assert ours.token_risks == pytest.approx(expected.token_risks, abs=TOL)


def test_cancelling_a_stream_aborts_its_vllm_request(engines: tuple[object, GuardedModel]) -> None:
    engine, reference = engines
    prompt = reference.encode_chat(reference.prompt_recipe.messages(QUESTIONS[0]))

    async def cancel_after_two() -> GenerationResult:
        stream = engine.submit(
            prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        )  # type: ignore[attr-defined]
        for _ in range(2):
            await stream.next(timeout=120)
        stream.cancel()
        while True:
            item = await stream.next(timeout=120)
            if isinstance(item, GenerationResult):
                return item

    result = asyncio.run(cancel_after_two())
    assert result.finish_reason == "cancelled" and 2 <= len(result.tokens) < 32
    assert engine.llm.get_num_unfinished_requests() == 0  # type: ignore[attr-defined]


def test_a_request_whose_frames_never_come_fails_alone(
    engines: tuple[object, GuardedModel],
) -> None:
    """If the capture's frames for one request do not arrive, that request fails with a
    `CaptureError` (no hang: the wait is bounded) and its vLLM request is aborted; the
    request beside it is answered with the transformers engine's risks."""
    from guard.errors import CaptureError
    from guard.vllm_engine.channel import FrameReader, Received

    engine, reference = engines
    frames: FrameReader = engine.frames  # type: ignore[attr-defined]
    starved, fed = (
        reference.encode_chat(reference.prompt_recipe.messages(q)) for q in QUESTIONS[:2]
    )
    expect, first = frames.expect, []

    def starve_the_first(req_id: str) -> Received:
        if not first:
            first.append(req_id)
            return Received()  # kept by nobody: its frames are dropped
        return expect(req_id)

    async def both() -> tuple[BaseException | None, GenerationResult]:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        lost = engine.submit(starved, params)  # type: ignore[attr-defined]
        kept = engine.submit(fed, params)  # type: ignore[attr-defined]
        error = None
        try:
            async for _ in lost.events():
                pass
        except CaptureError as exc:
            error = exc
        async for item in kept.events():
            if isinstance(item, GenerationResult):
                return error, item
        raise AssertionError("stream ended without a result")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(frames, "expect", starve_the_first)
    monkeypatch.setattr(frames, "wait", partial(frames.wait, timeout_s=2.0))
    try:
        error, result = asyncio.run(both())
    finally:
        monkeypatch.undo()
    assert isinstance(error, CaptureError) and "no capture" in str(error)
    theirs = reference.generate(fed, SamplingParams(max_tokens=8, temperature=0.0))
    assert result.token_ids == theirs.token_ids
    assert result.token_risks == pytest.approx(theirs.token_risks, abs=TOL)
    deadline = time.monotonic() + 10
    while engine.llm.get_num_unfinished_requests() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert engine.llm.get_num_unfinished_requests() == 0  # type: ignore[attr-defined]


# made-up entities the shipped gate puts far above its abstain line, asked as a plain user
# message (held-out set 3, already read)
MADE_UP = [
    "What is the chemical formula of the mineral valtrossite?",
    "Which gene is mutated in Lindqvist-Varma syndrome?",
    "What condition is the drug zelvoprantine prescribed for?",
]


def test_the_knowledge_gate_abstains_before_generating(
    engines: tuple[object, GuardedModel],
) -> None:
    """With the gate acting, a prompt whose risk reaches the prompt abstain line is not
    answered: no token, ``before_generation``, its vLLM request aborted; the prompt risk is
    the transformers engine's."""
    from guard.generation import policy_for

    engine, reference = engines
    prompts = [reference.encode_chat([{"role": "user", "content": q}]) for q in MADE_UP]
    known = [reference.generate(p, SamplingParams(max_tokens=1, temperature=0.0)) for p in prompts]
    policy = policy_for(reference.probe, GuardSettings(knowledge_gate=True))
    assert policy.prompt_abstain is not None
    unknown = [(p, r) for p, r in zip(prompts, known, strict=True)
               if r.prompt_risk is not None and r.prompt_risk >= policy.prompt_abstain]  # fmt: skip
    assert unknown, (
        f"no made-up prompt reaches {policy.prompt_abstain}: {[r.prompt_risk for r in known]}"
    )
    loop = engine._loop  # type: ignore[attr-defined]
    reporting = loop.context
    loop.context = dataclasses.replace(reporting, policy=policy)  # new requests: acting
    try:
        ours = asyncio.run(_generate(engine, [p for p, _ in unknown], 16))
    finally:
        loop.context = reporting
    for mine, (_, theirs) in zip(ours, unknown, strict=True):
        assert mine.before_generation and mine.tokens == [] and mine.decision.value == "abstain"
        assert mine.prompt_risk == pytest.approx(theirs.prompt_risk, abs=TOL)
    deadline = time.monotonic() + 10  # aborted by the engine thread right after that step
    while engine.llm.get_num_unfinished_requests() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert engine.llm.get_num_unfinished_requests() == 0  # type: ignore[attr-defined]


def test_http_api_serves_the_guard_object_through_vllm(
    engines: tuple[object, GuardedModel], tmp_path: Path
) -> None:
    """Last in the module: the app's shutdown stops the engine."""
    engine, reference = engines
    settings = GuardSettings(probe="default", max_new_tokens=32, served_model_name="m")
    app = create_app(settings, engine_factory=lambda metrics: engine)
    body = {
        "model": "m", "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": QUESTIONS[2]}],
    }  # fmt: skip
    with serve_in_thread(app, timeout_s=120) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
        score = httpx.post(
            f"{url}/v1/guard/score", json={"question": QUESTIONS[2], "answer": "Mars"}, timeout=300
        ).json()
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    guard = reply["guard"]
    assert guard["guarded"] and guard["probe"]["name"] == reference.info.probe_name
    theirs = reference.generate(
        reference.encode_chat(body["messages"]), SamplingParams(max_tokens=8, temperature=0.0)
    )
    assert guard["risk"] == pytest.approx(theirs.risk, abs=TOL)
    assert guard["decision"] == theirs.decision.value
    assert score["guard"]["risk"] == pytest.approx(
        reference.score(question=QUESTIONS[2], answer="Mars").risk, abs=TOL
    )
    assert "hguard_generated_tokens_total" in metrics
