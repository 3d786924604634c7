"""Long answers, claim by claim: sentence spans, per-token traces and pooled answer features.

The shipped probe scores an answer by the *mean* of its token logits, which a long,
fluent answer dilutes. This module holds what the long-form measurement
(`bench/longform.py`) needs to compare verdicts that do not dilute (answers are cut into
sentences by `guard.spans`, as at run time):

- `trace_answers`: one teacher-forced pass per batch (`guard.forcing.teacher_force`, the
  probe's neurons only) giving each answer's token logits ``s_t`` (`RiskScorer`), log-probs,
  entropies and the final hidden state at the last prompt token (the scope gate's input,
  the prompt-level knowledge probe's feature);
- `pooled_logits`: mean / max / top-k / windowed-mean pooling of ``s_t``;
- `sentence_risks`: the served scorer applied to each sentence's tokens as if the sentence
  were the whole answer.

    traces = trace_answers(loaded, scorer, records, batch_size=16)
    risks = sentence_risks(scorer, traces[0], answer_sentences(tokenizer, ids)[1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from guard.forcing import teacher_force
from guard.model import LoadedModel, pad_token_id
from guard.probe import PromptRecipe
from guard.scoring import AnswerStats, RiskScorer
from probes.collect import AnswerRecord

LONG_INSTRUCTION = "Answer in two or three sentences."
LONG_NEW_TOKENS = 96
LONG_RECIPE = PromptRecipe(instruction=LONG_INSTRUCTION, max_new_tokens=LONG_NEW_TOKENS)
TOP_K = 4
WINDOW = 8


@dataclass(frozen=True)
class AnswerTrace:
    """One answer's per-token values ``[tokens]`` and its prompt's final hidden state."""

    token_logits: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    prompt_hidden: np.ndarray  # [hidden]

    def stats(self, start: int = 0, stop: int | None = None) -> AnswerStats:
        """The served scorer's pooled features of tokens ``[start, stop)``."""
        part = slice(start, stop)
        return AnswerStats.from_tokens(
            self.token_logits[part], self.logprobs[part], self.entropies[part]
        )


def trace_answers(
    loaded: LoadedModel, scorer: RiskScorer, records: Sequence[AnswerRecord], batch_size: int
) -> list[AnswerTrace]:
    """Teacher-force every record (at least one response token each), length-sorted."""
    if any(not r.response_ids for r in records):
        raise ValueError("every answer needs a response token: drop empty answers first")
    pad_id = pad_token_id(loaded.tokenizer)
    order = sorted(
        range(len(records)), key=lambda i: len(records[i].prompt_ids) + len(records[i].response_ids)
    )
    out: list[AnswerTrace | None] = [None] * len(records)
    for first in tqdm(range(0, len(order), batch_size), desc="teacher-force", unit="batch"):
        rows = order[first : first + batch_size]
        traces = teacher_force(
            loaded.model,
            [records[i].prompt_ids for i in rows],
            [records[i].response_ids for i in rows],
            pad_id,
            scorer.neuron_selection(),
            with_prompt_hidden=True,
        )
        for i, trace in zip(rows, traces, strict=True):
            hidden = trace.prompt_hidden
            if hidden is None:  # asked for with with_prompt_hidden=True
                raise RuntimeError("teacher_force returned no prompt hidden state")
            out[i] = AnswerTrace(
                token_logits=scorer.measure(scorer.flatten(trace.cett))[:, 0].double().numpy(),
                logprobs=trace.logprobs.double().numpy(),
                entropies=trace.entropies.double().numpy(),
                prompt_hidden=hidden.double().numpy(),
            )
    return [trace for trace in out if trace is not None]


def save_traces(path: Path, ids: Sequence[str], traces: Sequence[AnswerTrace]) -> None:
    """Traces as one ``.npz`` (no pickles): concatenated token arrays and their offsets."""
    lengths = np.array([t.token_logits.size for t in traces], dtype=np.int64)
    np.savez(
        path,
        ids=np.array(list(ids), dtype=np.str_),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        token_logits=np.concatenate([t.token_logits for t in traces]),
        logprobs=np.concatenate([t.logprobs for t in traces]),
        entropies=np.concatenate([t.entropies for t in traces]),
        prompt_hidden=np.stack([t.prompt_hidden for t in traces]),
    )


def load_traces(path: Path) -> dict[str, AnswerTrace]:
    """The traces `save_traces` wrote, by answer id."""
    with np.load(path, allow_pickle=False) as data:
        offsets = data["offsets"]
        return {
            str(rid): AnswerTrace(
                token_logits=data["token_logits"][offsets[i] : offsets[i + 1]],
                logprobs=data["logprobs"][offsets[i] : offsets[i + 1]],
                entropies=data["entropies"][offsets[i] : offsets[i + 1]],
                prompt_hidden=data["prompt_hidden"][i],
            )
            for i, rid in enumerate(data["ids"])
        }


def pooled_logits(token_logits: np.ndarray) -> dict[str, float]:
    """Poolings of one answer's token logits: mean, max, top-`TOP_K` mean and the highest
    mean over `WINDOW` consecutive tokens (each over all tokens when the answer is shorter)."""
    s = np.asarray(token_logits, dtype=np.float64)
    k, w = min(TOP_K, s.size), min(WINDOW, s.size)
    windows = np.convolve(s, np.ones(w) / w, mode="valid")
    return {
        "mean": float(s.mean()),
        "max": float(s.max()),
        "topk": float(np.sort(s)[-k:].mean()),
        "window": float(windows.max()),
    }


def sentence_risks(
    scorer: RiskScorer, trace: AnswerTrace, ranges: Sequence[tuple[int, int]]
) -> np.ndarray:
    """The served risk of each sentence's tokens alone ``[sentences]`` (`RiskScorer.span_risks`)."""
    return np.array(scorer.span_risks(trace.token_logits, trace.logprobs, trace.entropies, ranges))
