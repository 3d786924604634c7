"""Where in an answer: sentences as character spans, and which tokens each one holds.

The runtime and the offline long-form measurement cut answers the same way (one
implementation; `probes.longform` uses it):
- `sentence_spans`: ``[start, end)`` character offsets of each sentence (abbreviations,
  initials and "No." do not end one; fragments under `MIN_SENTENCE_CHARS` join the next);
- `token_char_spans`: each response token's characters in the decoded answer;
- `sentence_token_ranges` / `answer_sentences`: the tokens of each sentence (a token
  belongs to the sentence its first character falls in, so the space before a sentence
  opens it).

    chars, tokens = answer_sentences(tokenizer, response_ids)
    spans = scored_spans(scorer, tokenizer, response_ids, logits, logprobs, entropies)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from guard.results import SpanRisk

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from guard.scoring import RiskScorer

MIN_SENTENCE_CHARS = 12

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


def token_char_spans(
    tokenizer: PreTrainedTokenizerBase, response_ids: list[int]
) -> list[tuple[int, int]]:
    """``[start, end)`` of each response token in ``decode(response_ids)`` (incremental decoding).

    A token that ends inside a multi-byte character (decoded as U+FFFD until the
    character completes) shares the span of the token that completes it.
    """
    spans: list[tuple[int, int]] = []
    stable_end = 0
    pending = 0
    for count in range(1, len(response_ids) + 1):
        prefix = str(tokenizer.decode(response_ids[:count], skip_special_tokens=True))
        pending += 1
        if prefix.endswith("\ufffd") and count < len(response_ids):
            continue
        end = max(len(prefix), stable_end)
        spans.extend([(stable_end, end)] * pending)
        stable_end, pending = end, 0
    return spans


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


def scored_spans(
    scorer: RiskScorer,
    tokenizer: PreTrainedTokenizerBase,
    response_ids: list[int],
    token_logits: Sequence[float] | np.ndarray,
    logprobs: Sequence[float] | np.ndarray,
    entropies: Sequence[float] | np.ndarray,
    text_length: int | None = None,
) -> list[SpanRisk]:
    """The sentences of a scored answer with their risks. ``text_length``: the answer
    text as delivered when a stop string cut it (spans end there; none start after)."""
    if not response_ids:
        return []
    chars, ranges = answer_sentences(tokenizer, response_ids)
    s, lp, ent = (np.asarray(v, dtype=np.float64) for v in (token_logits, logprobs, entropies))
    risks = scorer.span_risks(s, lp, ent, ranges)
    limit = text_length if text_length is not None else max((end for _, end in chars), default=0)
    return [
        SpanRisk(start, min(end, limit), risk)
        for (start, end), risk in zip(chars, risks, strict=True)
        if start < limit
    ]
