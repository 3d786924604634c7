"""Long answers, claim by claim: sentence spans, per-token traces and pooled answer features.

The shipped probe scores an answer by the *mean* of its token logits, which a long,
fluent answer dilutes. This module holds what the long-form measurement
(`bench/longform.py`) needs to compare verdicts that do not dilute:

- `sentence_spans`: an answer cut into sentences, ``[start, end)`` character offsets into
  the answer text (abbreviations and initials do not end a sentence; fragments under
  `MIN_SENTENCE_CHARS` join the next sentence), and `sentence_token_ranges`, which tokens
  each sentence holds (a token belongs to the sentence its first character falls in,
  so the space before a sentence opens it);
- `trace_answers`: one teacher-forced pass per batch (`guard.forcing.teacher_force`, the
  probe's neurons only) giving each answer's token logits ``s_t`` (`RiskScorer`), log-probs,
  entropies and the final hidden state at the last prompt token (the scope gate's input,
  the prompt-level knowledge probe's feature);
- `pooled_logits`: mean / max / top-k / windowed-mean pooling of ``s_t``;
- `sentence_risks`: the served scorer applied to each sentence's tokens as if the sentence
  were the whole answer.

    traces = trace_answers(loaded, scorer, records, batch_size=16)
    spans = sentence_spans(records[0].response)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.forcing import teacher_force
from guard.model import LoadedModel
from guard.probe import PromptRecipe
from guard.scoring import AnswerStats, RiskScorer
from probes.collect import AnswerRecord
from probes.judge import token_char_spans

LONG_INSTRUCTION = "Answer in two or three sentences."
LONG_NEW_TOKENS = 96
LONG_RECIPE = PromptRecipe(instruction=LONG_INSTRUCTION, max_new_tokens=LONG_NEW_TOKENS)
MIN_SENTENCE_CHARS = 12
TOP_K = 4
WINDOW = 8

_ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "no", "mt", "ft", "inc",
     "ltd", "co", "gen", "col", "lt", "sgt", "rev", "fig", "approx", "ca", "e.g", "i.e",
     "u.s", "u.k", "a.d", "b.c")
)  # fmt: skip
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|\n+")


def _ends_sentence(text: str, match: re.Match[str]) -> bool:
    """A '.' after an abbreviation, an initial or a number ("No. 5") ends nothing."""
    if match.group().startswith("\n") or not match.group().startswith("."):
        return True
    words = text[: match.start()].split()
    last = words[-1].lower().strip("(\"'") if words else ""
    return not (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence of ``text`` (stripped of surrounding whitespace);
    short fragments join the following sentence (the last joins the one before)."""
    cuts = [m.end() for m in _BOUNDARY.finditer(text) if _ends_sentence(text, m)]
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [*cuts, len(text)]:
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = end
    merged: list[tuple[int, int]] = []
    pending: int | None = None
    for begin, end in spans:
        begin = begin if pending is None else pending
        if end - begin < MIN_SENTENCE_CHARS:
            pending = begin
            continue
        merged.append((begin, end))
        pending = None
    if pending is not None:
        if merged:
            merged[-1] = (merged[-1][0], spans[-1][1])
        else:
            merged.append((pending, spans[-1][1]))
    return merged


def sentence_token_ranges(
    token_spans: Sequence[tuple[int, int]], sentences: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Half-open token ranges of each sentence; together they tile all the tokens (tokens
    after the last sentence join it). Sentences that get no token are dropped."""
    if not sentences:
        return [(0, len(token_spans))] if token_spans else []
    owner = []
    for start, _ in token_spans:
        index = next((i for i, (_, end) in enumerate(sentences) if start < end), None)
        owner.append(len(sentences) - 1 if index is None else index)
    ranges = []
    for sentence in range(len(sentences)):
        members = [t for t, o in enumerate(owner) if o == sentence]
        if members:
            ranges.append((members[0], members[-1] + 1))
    return ranges


def answer_sentences(
    tokenizer: PreTrainedTokenizerBase, response_ids: list[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(character spans, token ranges)`` of the sentences of a response, one per sentence."""
    text = str(tokenizer.decode(response_ids, skip_special_tokens=True))
    chars = sentence_spans(text)
    tokens = sentence_token_ranges(token_char_spans(tokenizer, response_ids), chars)
    if len(tokens) != len(chars):  # a sentence with no token of its own: keep them paired
        chars = [chars[0]] if not tokens else chars[: len(tokens)]
    return chars, tokens


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
    pad_id = int(loaded.tokenizer.pad_token_id or 0)
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
    """The served risk of each sentence's tokens alone ``[sentences]``."""
    return np.array([scorer.answer_risk(trace.stats(a, b)) for a, b in ranges])
