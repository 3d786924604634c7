"""The two sides of ``bench/overhead.py --engine vllm`` (run it in ``.venv-vllm``).

One vLLM engine serves both, so weights, KV cache, kernels and scheduler are identical:
- guarded: `VLLMEngine` as the server runs it (its thread, capture hooks, per-token risk
  through `RiskScorer`, our rows; vLLM is asked for one extra token so the last response
  token is fed and measured, as the transformers engine's final pass does: that step runs
  only the layers the guard reads, no LM head, `tail_steps` in the JSON);
- plain: the same `LLMEngine` with the capture's hooks removed, driven directly
  (``add_request``, ``step`` until done), the same prompts and forced token count.
The engine thread is idle (no live request) while the plain side drives vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from overhead import Run, Timing, _clock, _since

from guard.probe import Probe
from guard.results import GenerationResult
from guard.sampling import SamplingParams
from guard.settings import GuardSettings
from guard.vllm_engine import VLLMEngine
from guard.vllm_engine.requests import vllm_params

Sides = tuple[
    Run, Run, Callable[[Any], list[int]], Probe, str, Callable[[], None],
    Callable[[], dict[str, float]],
]  # fmt: skip


def vllm_sides(args: argparse.Namespace) -> Sides:
    """(plain, guarded, encode_chat, probe, model id, close, hook cost) on one vLLM
    engine; ``hook cost()``: the worker's hook time per step since the last call."""
    settings = GuardSettings(
        probe=args.probe or "default", max_batch=32, queue_size=256,
        **({"model": args.model} if args.model != "smollm2" else {}),
    )  # fmt: skip
    engine = VLLMEngine(settings)
    engine.start()
    if engine.probe is None:
        raise RuntimeError("the vLLM overhead bench needs a probe that verifies")
    return (
        lambda prompts, n: plain_run(engine, prompts, n),
        lambda prompts, n: guarded_run(engine, prompts, n),
        engine.encode_chat,
        engine.probe,
        engine.model_id,
        lambda: engine.stop(60),
        HookCost(engine),
    )


class HookCost:
    """The capture's hook seconds per vLLM step, from the worker's frames (only the guarded
    side's steps send frames: the plain side runs with the hooks removed)."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.frames = engine.frames
        self.frames.pop_seconds()
        self.start, self.tails = self.frames.merged, self.frames.tail_steps

    def __call__(self) -> dict[str, float]:
        steps, self.start = self.frames.merged - self.start, self.frames.merged
        tails, self.tails = self.frames.tail_steps - self.tails, self.frames.tail_steps
        seconds = self.frames.pop_seconds()
        return {
            "guarded_steps": steps,
            "tail_steps": tails,  # last steps that ran only the layers the guard reads
            "hook_ms_per_step": round(1000 * seconds / max(steps, 1), 3),
        }


def plain_run(engine: VLLMEngine, prompts: list[list[int]], new_tokens: int) -> Timing:
    """Plain vLLM: no hooks, our end tokens masked so every answer has ``new_tokens``."""
    from vllm.inputs import TokensPrompt

    llm = engine.llm
    wanted = SamplingParams(max_tokens=new_tokens - 1, temperature=0.0, ignore_eos=True)
    # max_tokens - 1 + 1: vllm_params asks for the guarded side's extra token
    engine.pause_capture()
    try:
        started = _clock()
        for i, prompt in enumerate(prompts):
            params = vllm_params(wanted, engine.context.end_ids, len(prompt))
            request = TokensPrompt(prompt_token_ids=prompt)
            llm.add_request(f"plain-{time.monotonic_ns()}-{i}", request, params)
        produced = 0
        while llm.has_unfinished_requests():
            for output in llm.step():
                produced += len(output.outputs[0].token_ids)
        elapsed = _since(started)
    finally:
        engine.resume_capture()
    if produced != new_tokens * len(prompts):
        raise RuntimeError(f"plain vLLM produced {produced} tokens, not {new_tokens} each")
    return elapsed


def guarded_run(engine: VLLMEngine, prompts: list[list[int]], new_tokens: int) -> Timing:
    """The guarded engine, streams as the server consumes them; checks every length."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def run_all() -> list[GenerationResult]:
        async def one(ids: list[int]) -> GenerationResult:
            async for item in engine.submit(ids, params).events():
                if isinstance(item, GenerationResult):
                    return item
            raise RuntimeError("stream ended without a result")

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    started = _clock()
    results = asyncio.run(run_all())
    elapsed = _since(started)
    if any(r.completion_tokens != new_tokens or r.risk is None for r in results):
        raise RuntimeError("guarded vLLM did not produce the forced token count")
    return elapsed
