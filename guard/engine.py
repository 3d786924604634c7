"""The engine seam: what the API layer needs from whatever generates and scores answers.

The HTTP layer (`guard.api`) talks to an `Engine` only: tokenise a request, submit it and
read its scored tokens as a `TokenStream`, cancel it, score a given answer, start and
stop. `TransformersEngine` implements it with our own continuously batched decode loop
(`guard.livebatch`) behind one worker thread (`guard.batching`); another engine (vLLM)
implements the same Protocol without touching the API layer. Whatever the engine, the
numbers come from `guard.scoring.RiskScorer` and the decision from `guard.policy.Policy`.

    engine = TransformersEngine(MicroBatcher(load_guarded(settings), max_batch=32))
    engine.start()
    stream = engine.submit(engine.encode_chat(messages), SamplingParams(max_tokens=32))
    async for item in stream.events(): ...   # TokenEvent..., then the GenerationResult
    engine.stop(timeout=10)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol

from guard.batching import MicroBatcher
from guard.decoding import SamplingParams, TokenEvent
from guard.generation import GuardedModel
from guard.results import GenerationResult, GuardInfo, ScoreResult

Event = TokenEvent | GenerationResult


class TokenStream(Protocol):
    """One submitted generation: scored tokens as they come, then one result."""

    async def next(self, timeout: float | None = None) -> Event:
        """The next token event or the final result; raises an engine error, or
        TimeoutError after ``timeout`` seconds."""
        ...

    def events(self) -> AsyncIterator[Event]:
        """Token events, then the final result."""
        ...

    def cancel(self) -> None:
        """Stop generating at the next step (the client went away); idempotent."""
        ...


class Engine(Protocol):
    """A serving engine behind the OpenAI-compatible API."""

    @property
    def model_id(self) -> str: ...
    @property
    def info(self) -> GuardInfo: ...
    @property
    def guarded(self) -> bool: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def validation_risk_quantiles(self) -> Mapping[str, float]: ...
    @property
    def depth(self) -> int:
        """Requests waiting for the engine (the queue-depth gauge)."""
        ...

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn of `encode_chat`'s rendering (added to a
        chat request's own; empty where the chat template ends turns with an end token)."""
        ...

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...
    def encode_text(self, text: str) -> list[int]: ...
    def encode_question(self, question: str) -> list[int]:
        """A question asked the way the probe's training questions were."""
        ...

    def encode_answer(self, text: str) -> list[int]: ...
    def start(self) -> None: ...
    def close(self) -> None:
        """Accept nothing new; what is queued or running still completes."""
        ...

    def stop(self, timeout: float | None = None) -> None:
        """Close, finish the running work (up to ``timeout`` s) and release the workers."""
        ...

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        """Queue a generation (from the event loop); raises OverloadedError when full and
        ShuttingDownError once closed."""
        ...

    async def score(self, prompt_ids: list[int], response_ids: list[int]) -> ScoreResult:
        """Judge ``response_ids`` as the continuation of ``prompt_ids`` (teacher-forced)."""
        ...


class TransformersEngine:
    """Our own decode loop on a transformers model: a `GuardedModel` and the worker that
    owns it (`MicroBatcher`)."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self.guarded_model: GuardedModel = batcher.guarded
        self.batcher = batcher

    @property
    def model_id(self) -> str:
        return self.guarded_model.model_id

    @property
    def info(self) -> GuardInfo:
        return self.guarded_model.info

    @property
    def guarded(self) -> bool:
        return self.guarded_model.guarded

    @property
    def vocab_size(self) -> int:
        return len(self.guarded_model.loaded.tokenizer)

    @property
    def validation_risk_quantiles(self) -> Mapping[str, float]:
        probe = self.guarded_model.probe
        return probe.manifest.validation_risk_quantiles if probe is not None else {}

    @property
    def depth(self) -> int:
        return self.batcher.depth

    @property
    def chat_stop(self) -> tuple[str, ...]:
        return self.guarded_model.chat_stop

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.guarded_model.encode_chat(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.guarded_model.encode_text(text)

    def encode_question(self, question: str) -> list[int]:
        return self.guarded_model.prompts.encode_question(question)

    def encode_answer(self, text: str) -> list[int]:
        return self.guarded_model.encode_answer(text)

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()

    def stop(self, timeout: float | None = None) -> None:
        self.batcher.stop(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        return self.batcher.submit(prompt_ids, params)

    async def score(self, prompt_ids: list[int], response_ids: list[int]) -> ScoreResult:
        guarded = self.guarded_model
        return await self.batcher.run_exclusive(lambda: guarded.score_ids(prompt_ids, response_ids))
