"""The guard inside vLLM: an `Engine` (guard.engine) whose forward passes, continuous
batching and scheduling are vLLM's, and whose numbers and decisions are still
`guard.scoring.RiskScorer`'s and `guard.policy.Policy`'s.

Only ``.venv-vllm`` (``make install-vllm``) has vLLM; nothing outside this package
imports it, and this package is imported only for ``hguard serve --engine vllm`` and the
vLLM benchmarks and tests. docs/ARCHITECTURE.md, "The vLLM engine", has the design.

    engine = VLLMEngine(GuardSettings(probe="default"))
    engine.start()
    stream = engine.submit(engine.encode_question("Capital of France?"), SamplingParams())
"""

from guard.vllm_engine.engine import VLLMEngine

__all__ = ["VLLMEngine"]
