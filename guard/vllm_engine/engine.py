"""VLLMEngine: the `Engine` Protocol on vLLM's in-process engine core.

Process layout (this step): the API process runs vLLM's `LLMEngine` in process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: engine core, scheduler, `UniProcExecutor` and the
worker share this process) on one thread, ``vllm-engine``, that owns it: it admits
submitted requests, runs ``step()`` while any is live, and hands each step's captured
values (`guard.vllm_engine.capture.StepCapture`, hooked into the worker's model through
``collective_rpc``) to the requests' rows. Cancelling a stream (client gone, policy abort,
stop string) aborts its vLLM request before the next step. The target layout (vLLM's
multiprocess engine, a worker extension and a channel back) is in docs/ARCHITECTURE.md.

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
from functools import partial
from pathlib import Path
from typing import Any

import torch
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
from guard.model import PromptEncoder, end_ids_of, fingerprint_model, prepare_tokenizer
from guard.neurons import find_mlp_layers
from guard.policy import Policy
from guard.probe import Probe, PromptRecipe
from guard.results import GuardInfo, ScoreResult
from guard.sampling import SamplingParams
from guard.scope import ScopeGate
from guard.scoring import RiskScorer
from guard.settings import GuardSettings
from guard.vllm_engine.capture import StepCapture
from guard.vllm_engine.loop import EngineLoop
from guard.vllm_engine.requests import PromptGates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMContext:
    """The `RowContext` of every row: tokenizer, scorer, policy, who judges, end tokens."""

    tokenizer: PreTrainedTokenizerBase
    scorer: RiskScorer | None
    policy: Policy
    info: GuardInfo
    end_ids: frozenset[int]


def build_llm(directory: Path, settings: GuardSettings, **overrides: Any) -> Any:
    """vLLM's in-process `LLMEngine` on an exported float32 directory, eager (the hooks
    must run: no CUDA graphs, no torch.compile), synchronous scheduling (a step's outputs
    are that step's), our own tokenisation."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    options: dict[str, Any] = {
        "model": str(directory), "dtype": "float32", "enforce_eager": True, "seed": 0,
        "max_num_seqs": settings.max_batch, "async_scheduling": False,
        "max_model_len": settings.max_prompt_tokens + settings.max_new_tokens + 1,
        "skip_tokenizer_init": True,
    }  # fmt: skip
    options.update(overrides)
    if not options["enforce_eager"]:
        raise GuardError(
            "the vLLM engine needs enforce_eager: CUDA graphs replay without running the "
            "capture's hooks and torch.compile traces them into graph breaks"
        )
    return LLMEngine.from_engine_args(EngineArgs(**options))


def _install_capture(
    scorer: RiskScorer | None, knowledge_layer: int | None, worker: Any
) -> StepCapture:
    capture = StepCapture(worker.model_runner, scorer, knowledge_layer)
    capture.__enter__()
    return capture


def _executed_weight(module: torch.nn.Module) -> torch.Tensor:
    """``W_down`` ``[out, in]`` as vLLM computes with it: its CPU build packs linear weights
    for oneDNN and drops ``weight``; the layer applied to the identity gives it back (one
    product per output, exact in float32)."""
    width = int(module.input_size_per_partition)  # type: ignore[arg-type]
    with torch.no_grad():
        eye = torch.eye(width, dtype=torch.float32)
        out = module(eye)
        out = out[0] if isinstance(out, tuple) else out
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not getattr(module, "skip_bias_add", False):
            out = out - bias
    return out.T.contiguous()


def _fingerprint(worker: Any) -> ModelFingerprint:
    """The fingerprint of the weights vLLM computes with (TP = 1: every column on this
    rank). Packed (CPU) down projections get their weight back for the capture's column
    norms; `_drop_restored` frees it once the capture has them."""
    model = worker.model_runner.get_model()
    for layer in find_mlp_layers(model):
        weight = layer.module.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
            restored = torch.nn.Parameter(_executed_weight(layer.module), requires_grad=False)
            layer.module.weight = restored
            setattr(layer.module, "_hguard_restored", True)  # noqa: B010
    return fingerprint_model(model)


def _drop_restored(worker: Any) -> None:
    for layer in find_mlp_layers(worker.model_runner.get_model()):
        if getattr(layer.module, "_hguard_restored", False):
            layer.module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            delattr(layer.module, "_hguard_restored")  # noqa: B043


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
        self.llm = build_llm(directory, settings, **llm_options)
        fingerprint = self.llm.collective_rpc(_fingerprint)[0]
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
        install = partial(_install_capture, scorer, knowledge)
        self.capture: StepCapture = self.llm.collective_rpc(install)[0]
        self.llm.collective_rpc(_drop_restored)
        self.metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self._loop = EngineLoop(self.llm, self.capture, self.context, self.gates, self._queue,
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
        self.capture.__exit__(None, None, None)
        shutdown = getattr(self.llm.engine_core, "shutdown", None)
        if callable(shutdown):
            shutdown()

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
