"""VLLMEngine: the `Engine` Protocol on vLLM.

Process layout: by default vLLM's own (``VLLM_ENABLE_V1_MULTIPROCESSING=1``): the engine
core and its worker run in their own processes; the worker loads the guard's extension
(`guard.vllm_engine.worker`), whose capture (`guard.vllm_engine.capture.StepCapture`)
sends each step's values back on a channel (`guard.vllm_engine.channel`). With
``GUARD_VLLM_MULTIPROCESS=false`` vLLM runs in this process (same extension, same channel).
Either way one thread, ``vllm-engine``, owns vLLM's `LLMEngine` client
(`guard.vllm_engine.loop`): it admits submitted requests, runs ``step()`` while any is
live and feeds each output, with the frames it needs, to its request. Cancelling a stream
(client gone, policy abort, stop string) aborts its vLLM request before the next step.

    engine = VLLMEngine(GuardSettings(probe="default"), metrics)
    engine.start(); stream = engine.submit(ids, SamplingParams(max_tokens=32)); engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.batching import Ticket, enqueue
from guard.errors import GuardError, InvalidRequestError
from guard.export import exported_dir, exported_fingerprint
from guard.fingerprint import ModelFingerprint
from guard.generation import guard_info, policy_for
from guard.knowledge import KnowledgeGate
from guard.loading import model_spec_of, settings_probe, verified_probe
from guard.metrics import GuardMetrics
from guard.model import PromptEncoder, end_ids_of, prepare_tokenizer
from guard.policy import Policy
from guard.probe import Probe, PromptRecipe
from guard.results import GuardInfo, ScoreResult
from guard.sampling import SamplingParams
from guard.scope import ScopeGate
from guard.scoring import RiskScorer
from guard.settings import GuardSettings
from guard.vllm_engine.channel import FrameReader
from guard.vllm_engine.loop import EngineLoop
from guard.vllm_engine.requests import PromptGates
from guard.vllm_engine.worker import EXTENSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMContext:
    """The `RowContext` of every row: tokenizer, scorer, policy, who judges, end tokens."""

    tokenizer: PreTrainedTokenizerBase
    scorer: RiskScorer | None
    policy: Policy
    info: GuardInfo
    end_ids: frozenset[int]


def build_llm(
    directory: Path, settings: GuardSettings, *, every_prompt_token: bool = False, **overrides: Any
) -> Any:
    """vLLM's `LLMEngine` on an exported float32 directory with the guard's worker
    extension: eager (the hooks must run: no CUDA graphs, no torch.compile), synchronous
    scheduling, our own tokenisation; in this process or vLLM's own layout.
    ``every_prompt_token``: the capture reads every prompt token (a max-pooled knowledge
    gate), so no prompt may take its first tokens from vLLM's prefix cache."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if settings.vllm_multiprocess else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    options: dict[str, Any] = {
        "model": str(directory), "dtype": "float32", "enforce_eager": True, "seed": 0,
        "max_num_seqs": settings.max_batch, "async_scheduling": False,
        "max_model_len": settings.max_prompt_tokens + settings.max_new_tokens + 1,
        "skip_tokenizer_init": True, "worker_extension_cls": EXTENSION,
    }  # fmt: skip
    if every_prompt_token:
        options["enable_prefix_caching"] = False
    options.update(overrides)
    if every_prompt_token and options["enable_prefix_caching"]:
        raise GuardError(
            "the probe's knowledge gate reads every prompt token: vLLM's prefix caching "
            "would skip the cached ones (enable_prefix_caching must stay off)"
        )
    if not options["enforce_eager"]:
        raise GuardError(
            "the vLLM engine needs enforce_eager: CUDA graphs replay without running the "
            "capture's hooks and torch.compile traces them into graph breaks"
        )
    return LLMEngine.from_engine_args(EngineArgs(**options))


class VLLMEngine:
    """The `Engine` Protocol on vLLM; ``**llm_options`` go to vLLM's `EngineArgs`."""

    def __init__(
        self,
        settings: GuardSettings,
        metrics: GuardMetrics | None = None,
        **llm_options: Any,
    ) -> None:
        probe = settings_probe(settings)
        spec = settings.model or model_spec_of(probe)
        directory = exported_dir(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        prepare_tokenizer(self.tokenizer)
        config = PretrainedConfig.from_pretrained(directory, local_files_only=True)
        generation = GenerationConfig.from_pretrained(directory, local_files_only=True)
        recorded = exported_fingerprint(directory)
        self._model_id = self._name(directory, spec)
        recipe = probe.manifest.knowledge if probe is not None else None
        pooled = recipe is not None and recipe.feature == "residual_max_prompt_token"
        self.llm = build_llm(directory, settings, every_prompt_token=pooled, **llm_options)
        fingerprint = ModelFingerprint.model_validate(
            self.llm.collective_rpc("hguard_fingerprint")[0]
        )
        if recorded is not None and recorded != fingerprint:
            log.warning("vLLM's weights differ from the export's record: %s", directory)
        self.probe: Probe | None = verified_probe(settings, probe, fingerprint)
        self.prompts = PromptEncoder(self.tokenizer, self.prompt_recipe)
        scorer = RiskScorer(self.probe) if self.probe is not None else None
        policy = policy_for(self.probe, settings)
        self.gates = PromptGates()
        if self.probe is not None:
            hidden = int(config.hidden_size)
            scope = None
            if settings.scope_gate:
                scope = ScopeGate.for_hidden_size(self.probe, hidden, settings.scope_threshold)
            self.gates = PromptGates(scope, KnowledgeGate.from_probe(self.probe, hidden))
        end_ids = frozenset(end_ids_of(generation, self.tokenizer))
        info = guard_info(self.probe, policy)
        self.context = VLLMContext(self.tokenizer, scorer, policy, info, end_ids)
        knowledge = self.gates.knowledge.layer if self.gates.knowledge is not None else None
        self.frames = FrameReader()
        probe_args = (None, None) if self.probe is None else (
            str(self.probe.path), self.probe.manifest_sha256
        )  # fmt: skip
        install = (*probe_args, knowledge, self.frames.address)
        self.llm.collective_rpc("hguard_install", args=install)
        self.metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self._loop = EngineLoop(self.llm, self.frames, self.context, self.gates, self._queue,
                                metrics)  # fmt: skip
        self._closed = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _name(directory: Path, spec: str) -> str:
        record = directory / "hguard-fingerprint.json"
        if record.is_file():
            import json

            return str(json.loads(record.read_text()).get("model_id", spec))
        return spec

    # --- Engine Protocol: identity ---
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def info(self) -> GuardInfo:
        return self.context.info

    @property
    def guarded(self) -> bool:
        return self.context.scorer is not None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def validation_risk_quantiles(self) -> Mapping[str, float]:
        return self.probe.manifest.validation_risk_quantiles if self.probe is not None else {}

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # --- tokenising ---
    @property
    def prompt_recipe(self) -> PromptRecipe:
        return self.probe.manifest.prompt if self.probe is not None else PromptRecipe()

    @property
    def chat_stop(self) -> tuple[str, ...]:
        return self.prompts.chat_stop

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.prompts.encode_chat(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.prompts.encode_text(text)

    def encode_question(self, question: str) -> list[int]:
        return self.prompts.encode_question(question)

    def encode_answer(self, text: str) -> list[int]:
        return self.prompts.encode_answer(text)

    # --- lifecycle ---
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop.run, name="vllm-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Close, let live requests finish (up to ``timeout`` s), stop the thread and vLLM."""
        self._closed = True
        self._loop.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        shutdown = getattr(self.llm.engine_core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.frames.close()

    def pause_capture(self) -> None:
        """Remove the capture's hooks from vLLM's model (the overhead bench's plain side;
        no live request may need them)."""
        self.llm.collective_rpc("hguard_pause")

    def resume_capture(self) -> None:
        self.llm.collective_rpc("hguard_resume")

    # --- work ---
    def _put(self, item: Any) -> None:
        enqueue(self._queue, item, closed=self._closed)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Ticket:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        ticket = Ticket(asyncio.get_running_loop(), prompt_ids, params)
        self._put(ticket)
        return ticket

    async def score(self, prompt_ids: list[int], response_ids: list[int]) -> ScoreResult:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        if not response_ids:
            raise InvalidRequestError("the answer is empty: give at least one token to score")
        future: Future[ScoreResult] = Future()
        self._put(("score", prompt_ids, response_ids, future))
        return await asyncio.wrap_future(future)
