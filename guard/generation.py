"""GuardedModel: a model, its tokenizer and a verified probe, generating and scoring under guard.

It owns the pieces (model, tokenizer, probe, `RiskScorer`, `Policy`, scope gate) and offers
- `generate_batch`: decode several requests together as one fixed batch (`guard.livebatch`),
  each token's risk computed as it is produced and sent to its own request's sink;
- `live_batch`: an empty running batch that requests join and leave step by step (the
  server's worker keeps one);
- `generate`: one request, blocking, for scripts and tests;
- `score` / `score_ids`: teacher-force a given answer (`guard.forcing`) and judge it with
  exactly the same arithmetic as live generation.

Forward passes through one model must be serialised (`NeuronCapture` refuses overlapping
captures): the server calls it from one worker thread (`guard.batching`).

    guarded = GuardedModel(load_model("smollm2"), load_probe("default"))
    result = guarded.generate(guarded.encode_chat([{"role": "user", "content": "Hi"}]))
    result.text, result.risk, result.decision
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from guard.decoding import (
    DecodeEngine,
    GenerationRequest,
    RowContext,
    SamplingParams,
    StepInfo,
    TokenEvent,
)
from guard.errors import InvalidRequestError
from guard.forcing import teacher_force
from guard.knowledge import KnowledgeGate
from guard.livebatch import DEFAULT_PREFILL_TOKENS, LiveBatch, decode_batch
from guard.model import LoadedModel, PromptEncoder, end_token_ids, pad_token_id
from guard.neurons import find_mlp_layers
from guard.policy import Policy, ThresholdOverrides
from guard.probe import Probe, PromptRecipe
from guard.results import GenerationResult, GuardInfo, ScopeVerdict, ScoreResult, TokenRisk
from guard.scope import ScopeGate
from guard.scoring import RiskScorer
from guard.spans import scored_spans

# Thresholds when serving unguarded (no probe): nothing is ever flagged.
_UNGUARDED_POLICY = Policy(flag=1.0, abstain=1.0)


@dataclass
class CollectingSink:
    """A sink that keeps everything: for the blocking `GuardedModel.generate`."""

    on_event: Callable[[TokenEvent], None] | None = None
    events: list[TokenEvent] = field(default_factory=list)
    result: GenerationResult | None = None

    def on_token(self, event: TokenEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def on_finish(self, result: GenerationResult) -> None:
        self.result = result

    def cancelled(self) -> bool:
        return False


def policy_for(
    probe: Probe | None, overrides: ThresholdOverrides | None = None, *, prompt_risk: bool = True
) -> Policy:
    """The probe's thresholds with the settings' overrides; never-flag when unguarded.
    The knowledge gate's thresholds are in force only when the settings ask for it
    (``knowledge_gate``) and the engine computes the prompt risk (``prompt_risk``); else
    its risk is reported, never acted on."""
    if probe is None:
        return _UNGUARDED_POLICY
    acting = prompt_risk and overrides is not None and overrides.knowledge_gate
    knowledge = probe.manifest.knowledge if acting else None
    return Policy.from_probe(probe.manifest.thresholds, overrides, knowledge)


def guard_info(probe: Probe | None, policy: Policy) -> GuardInfo:
    """Who judges (the ``guard`` object's probe and thresholds)."""
    return GuardInfo(
        probe_name=probe.name if probe is not None else None,
        probe_sha256=probe.manifest_sha256 if probe is not None else None,
        thresholds=policy.thresholds() if probe is not None else None,
    )


class GuardedModel:
    """A loaded model with a verified probe (or explicitly none: unguarded).

    guarded = GuardedModel(loaded, probe)   # `guard.loading` builds it from settings
    """

    def __init__(
        self,
        loaded: LoadedModel,
        probe: Probe | None,
        *,
        policy: Policy | None = None,
        overrides: ThresholdOverrides | None = None,
        scope_gate: bool = True,
        scope_threshold: float | None = None,
    ) -> None:
        self.loaded = loaded
        self.probe = probe
        self.prompts = PromptEncoder(loaded.tokenizer, self.prompt_recipe)
        self.scorer: RiskScorer | None = None
        self.scope_gate: ScopeGate | None = None
        self.knowledge_gate: KnowledgeGate | None = None
        if probe is not None:
            probe.verify_model(loaded.fingerprint)
            self.scorer = RiskScorer(probe, device=self.device)
            if scope_gate:
                self.scope_gate = ScopeGate.from_probe(probe, loaded.model, scope_threshold)
            hidden_size = int(loaded.model.config.hidden_size)
            self.knowledge_gate = KnowledgeGate.from_probe(probe, hidden_size)
        self.policy = policy or policy_for(probe, overrides)
        self.info = guard_info(probe, self.policy)
        tokenizer = loaded.tokenizer
        self.end_ids = frozenset(end_token_ids(loaded.model, tokenizer))
        self.pad_id = pad_token_id(tokenizer)
        self._engine = DecodeEngine(
            model=loaded.model,
            tokenizer=tokenizer,
            scorer=self.scorer,
            policy=self.policy,
            info=self.info,
            end_ids=self.end_ids,
            mlp_layers=find_mlp_layers(loaded.model),
            pad_id=self.pad_id,
            scope_gate=self.scope_gate,
            knowledge_gate=self.knowledge_gate,
        )

    @property
    def guarded(self) -> bool:
        return self.scorer is not None

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def prompt_recipe(self) -> PromptRecipe:
        """How the probe's training questions were asked (default recipe when unguarded)."""
        return self.probe.manifest.prompt if self.probe is not None else PromptRecipe()

    @property
    def chat_stop(self) -> tuple[str, ...]:
        return self.prompts.chat_stop

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation (`guard.model.PromptEncoder`)."""
        return self.prompts.encode_chat(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.prompts.encode_text(text)

    def encode_answer(self, text: str) -> list[int]:
        return self.prompts.encode_answer(text)

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> None:
        """Decode ``requests`` as one batch; each sink receives its tokens and its result."""
        decode_batch(self._engine, requests, on_step)

    def live_batch(
        self,
        on_step: Callable[[StepInfo], None] | None = None,
        *,
        prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        reuse_prefix: bool = True,
    ) -> LiveBatch:
        """An empty running batch on this model: requests `add`ed join it at its next
        `step` (see `guard.livebatch.LiveBatch` for ``prefill_tokens``, ``reuse_prefix``)."""
        return LiveBatch(
            self._engine, on_step, prefill_tokens=prefill_tokens, reuse_prefix=reuse_prefix
        )

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        on_event: Callable[[TokenEvent], None] | None = None,
    ) -> GenerationResult:
        """Generate one answer (blocking) with its risk and decision."""
        sink = CollectingSink(on_event)
        self.generate_batch([GenerationRequest(prompt_ids, params or SamplingParams(), sink)])
        if sink.result is None:  # decode_batch always finishes every row
            raise RuntimeError("generation ended without a result")
        return sink.result

    def score(
        self,
        *,
        answer: str,
        question: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
    ) -> ScoreResult:
        """Teacher-force ``answer`` after ``question`` (asked with the probe's prompt recipe)
        or after chat ``messages``, and judge it."""
        if (question is None) == (messages is None):
            raise InvalidRequestError("give exactly one of 'question' or 'messages'")
        if messages is None:
            messages = self.prompt_recipe.messages(question or "")
        response = self.encode_answer(answer)
        return self.score_ids(self.encode_chat(messages), response)

    def score_ids(self, prompt_ids: list[int], response_ids: list[int]) -> ScoreResult:
        """Judge the given response tokens as the continuation of the prompt tokens."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        if not response_ids:
            raise InvalidRequestError("the answer is empty: give at least one token to score")
        if self.scorer is None:
            return judge_answer(self._engine, response_ids)
        scorer = self.scorer
        trace = teacher_force(
            self.loaded.model,
            [prompt_ids],
            [response_ids],
            self.pad_id,
            scorer.neuron_selection(),
            layers=self._engine.mlp_layers,
            with_prompt_hidden=self.scope_gate is not None,
            knowledge=self.knowledge_gate,
        )[0]
        scope = None
        if self.scope_gate is not None and trace.prompt_hidden is not None:
            scope = self.scope_gate.judge(trace.prompt_hidden[None])[0]
        prompt_risk = trace.prompt_risk
        measured = scorer.measure(scorer.flatten(trace.cett))  # [tokens, 1 + layers]
        forced = (measured, trace.logprobs.numpy(), trace.entropies.numpy())
        return judge_answer(self._engine, response_ids, forced, scope, prompt_risk)


def judge_answer(
    context: RowContext,
    response_ids: list[int],
    forced: tuple[torch.Tensor | np.ndarray, np.ndarray, np.ndarray] | None = None,
    scope: ScopeVerdict | None = None,
    prompt_risk: float | None = None,
) -> ScoreResult:
    """The verdict on a teacher-forced answer from its measurements (every engine's
    ``score``): ``forced`` = (`RiskScorer.measure` rows ``[tokens, 1 + layers]``, log-probs,
    entropies), None when unguarded; ``prompt_risk`` from the knowledge gate, if any."""
    tokenizer, scorer = context.tokenizer, context.scorer
    texts = [str(tokenizer.decode([i], skip_special_tokens=True)) for i in response_ids]
    if scorer is None or forced is None:
        tokens = [TokenRisk(i, t, None) for i, t in zip(response_ids, texts, strict=True)]
        return ScoreResult(context.info, None, context.policy.decide(None), tokens)
    measured, logprobs, entropies = forced
    score = scorer.score_answer(measured, logprobs, entropies)
    tokens = [
        TokenRisk(i, t, float(r))
        for i, t, r in zip(response_ids, texts, score.token_risks, strict=True)
    ]
    logits = np.asarray(measured[:, 0], dtype=np.float64)
    spans = scored_spans(scorer, tokenizer, response_ids, logits, logprobs, entropies)
    decision = context.policy.decide(score.risk, scope=scope, prompt_risk=prompt_risk)
    return ScoreResult(
        context.info, score.risk, decision, tokens, score.layers, scope=scope, spans=spans,
        prompt_risk=prompt_risk,
    )  # fmt: skip
