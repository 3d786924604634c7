"""The worker and its queue: requests join a running batch instead of waiting for it, scoring
runs between decode steps, the queue holds only what waits, and the metrics mean that."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from guard.batching import MicroBatcher, Ticket
from guard.decoding import SamplingParams, TokenEvent
from guard.errors import OverloadedError
from guard.generation import GuardedModel
from guard.metrics import GuardMetrics
from guard.probe import load_probe
from guard.results import GenerationResult
from tests.fixtures.models import tiny_loaded
from tests.fixtures.probes import write_probe

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> GuardedModel:
    loaded = tiny_loaded()
    return GuardedModel(loaded, load_probe(write_probe(tmp_path_factory.mktemp("p"), loaded)))


@pytest.fixture
def batcher(guarded: GuardedModel) -> Iterator[tuple[MicroBatcher, CollectorRegistry]]:
    registry = CollectorRegistry()
    batcher = MicroBatcher(
        guarded, max_batch=4, queue_size=2, batch_wait_ms=0, metrics=GuardMetrics(registry)
    )
    batcher.start()
    yield batcher, registry
    batcher.stop(timeout=30)


def _prompt(guarded: GuardedModel, text: str) -> list[int]:
    return guarded.encode_chat([{"role": "user", "content": text}])


async def _tokens(ticket: Ticket, count: int) -> list[TokenEvent]:
    events = []
    while len(events) < count:
        item = await ticket.next(timeout=60)
        assert isinstance(item, TokenEvent)
        events.append(item)
    return events


async def _result(ticket: Ticket) -> tuple[int, GenerationResult]:
    tokens = 0
    async for item in ticket.events():
        if isinstance(item, GenerationResult):
            return tokens, item
        tokens += 1
    raise AssertionError("no result")


def test_a_request_joins_a_running_batch_and_leaves_it_first(
    guarded: GuardedModel, batcher: tuple[MicroBatcher, CollectorRegistry]
) -> None:
    worker, registry = batcher
    alone = guarded.generate(_prompt(guarded, "Hi"), SHORT)

    async def scenario() -> None:
        long = worker.submit(_prompt(guarded, "Tell me a story."), LONG)
        await _tokens(long, 2)
        short = worker.submit(_prompt(guarded, "Hi"), SHORT)
        tokens, result = await _result(short)
        assert tokens == 3 and result.token_ids == alone.token_ids
        assert result.risk == pytest.approx(alone.risk, abs=1e-4)
        assert not long.finished  # the short answer did not wait for the long one
        long.cancel()
        _, stopped = await _result(long)
        assert stopped.finish_reason == "cancelled" and stopped.completion_tokens < 400

    asyncio.run(scenario())
    # one observation per join: the long request alone, then the short one beside it
    assert registry.get_sample_value("hguard_batch_size_count") == 2.0
    assert registry.get_sample_value("hguard_batch_size_sum") == 1.0 + 2.0
    assert registry.get_sample_value("hguard_queue_depth") == 0.0


def test_scoring_runs_between_decode_steps(
    guarded: GuardedModel, batcher: tuple[MicroBatcher, CollectorRegistry]
) -> None:
    worker, _ = batcher
    prompt = _prompt(guarded, "Hi")
    answer = guarded.generate(prompt, SHORT)
    idle = guarded.score_ids(prompt, answer.token_ids)

    async def scenario() -> None:
        long = worker.submit(_prompt(guarded, "Tell me a story."), LONG)
        await _tokens(long, 2)
        scored = await worker.run_exclusive(lambda: guarded.score_ids(prompt, answer.token_ids))
        assert scored.risk == pytest.approx(idle.risk, abs=1e-4)
        assert not long.finished
        long.cancel()
        await _result(long)

    asyncio.run(scenario())


def test_the_queue_holds_only_what_waits_for_a_row(guarded: GuardedModel) -> None:
    worker = MicroBatcher(guarded, max_batch=1, queue_size=1, batch_wait_ms=0)
    worker.start()

    async def scenario() -> None:
        running = worker.submit(_prompt(guarded, "Tell me a story."), LONG)
        await _tokens(running, 1)
        assert worker.depth == 0  # the running request is in the batch, not the queue
        waiting = worker.submit(_prompt(guarded, "Hi"), SHORT)
        assert worker.depth == 1
        with pytest.raises(OverloadedError, match="queue is full"):
            worker.submit(_prompt(guarded, "Hi"), SHORT)
        running.cancel()
        await _result(running)
        tokens, _ = await _result(waiting)
        assert tokens == 3 and worker.depth == 0

    try:
        asyncio.run(scenario())
    finally:
        worker.stop(timeout=30)


def test_stop_drains_running_and_queued_requests(guarded: GuardedModel) -> None:
    worker = MicroBatcher(guarded, max_batch=1, queue_size=4, batch_wait_ms=0)
    worker.start()

    async def scenario() -> list[int]:
        tickets = [worker.submit(_prompt(guarded, f"q{i}"), SHORT) for i in range(3)]
        await asyncio.to_thread(worker.stop, 60)
        return [(await _result(t))[0] for t in tickets]

    assert asyncio.run(scenario()) == [3, 3, 3]
