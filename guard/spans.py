"""Where in an answer: sentences as character spans, and which tokens each one holds.

The runtime and the offline long-form measurement cut answers the same way (one
implementation; `probes.longform` uses it):
- `sentence_spans`: ``[start, end)`` character offsets of each sentence (abbreviations,
  initials and "No." do not end one; fragments under `MIN_SENTENCE_CHARS` join the next);
- `token_char_spans`: each response token's characters in the decoded answer;
- `sentence_token_ranges` / `answer_sentences`: the tokens of each sentence (a token
  belongs to the sentence its first character falls in, so the space before a sentence
  opens it);
- `SentenceStream`: the same sentences while the answer streams, each scored as soon as
  it is final (the riskiest so far is what stream chunks show and what the abort rule
  may act on).

    chars, tokens = answer_sentences(tokenizer, response_ids)
    spans = scored_spans(scorer, tokenizer, response_ids, logits, logprobs, entropies)
"""

from __future__ import annotations

import re
from bisect import bisect_left
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


class TokenOffsets:
    """Each response token's ``[start, end)`` in the decoded answer, one token at a time:
    `push` the answer decoded up to and including the token (incremental decoding).

    A token that ends inside a multi-byte character (decoded as U+FFFD until the
    character completes) shares the span of the token that completes it; a token's start
    is known when it is pushed (``next_start``), its end once its character is complete.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.next_start = 0
        self._pending = 0

    def push(self, decoded: str, *, last: bool = False) -> None:
        self._pending += 1
        if decoded.endswith("\ufffd") and not last:
            return
        end = max(len(decoded), self.next_start)
        self.spans.extend([(self.next_start, end)] * self._pending)
        self.next_start, self._pending = end, 0


def token_char_spans(
    tokenizer: PreTrainedTokenizerBase, response_ids: list[int]
) -> list[tuple[int, int]]:
    """``[start, end)`` of each response token in ``decode(response_ids)`` (`TokenOffsets`)."""
    offsets = TokenOffsets()
    for count in range(1, len(response_ids) + 1):
        prefix = str(tokenizer.decode(response_ids[:count], skip_special_tokens=True))
        offsets.push(prefix, last=count == len(response_ids))
    return offsets.spans


def sentence_token_ranges(
    token_spans: Sequence[tuple[int, int]], sentences: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Half-open token ranges of each sentence, one per sentence (empty, ``(n, n)``, for a
    sentence that no token starts in); together they tile all the tokens (tokens after the
    last sentence join it)."""
    if not sentences:
        return [(0, len(token_spans))] if token_spans else []
    starts = [start for start, _ in token_spans]
    cuts = [bisect_left(starts, end) for _, end in sentences[:-1]]
    return list(zip([0, *cuts], [*cuts, len(starts)], strict=True))


def answer_sentences(
    tokenizer: PreTrainedTokenizerBase, response_ids: list[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(character spans, token ranges)`` of the sentences of a response, paired; a
    sentence that holds no token of its own is left out."""
    text = str(tokenizer.decode(response_ids, skip_special_tokens=True))
    chars = sentence_spans(text)
    ranges = sentence_token_ranges(token_char_spans(tokenizer, response_ids), chars)
    if not chars:
        return [], ranges
    pairs = [(span, rng) for span, rng in zip(chars, ranges, strict=True) if rng[1] > rng[0]]
    return [span for span, _ in pairs], [rng for _, rng in pairs]


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
    chars, ranges = answer_sentences(tokenizer, response_ids)
    if not chars:  # no answer, or only whitespace: no sentence
        return []
    s, lp, ent = (np.asarray(v, dtype=np.float64) for v in (token_logits, logprobs, entropies))
    risks = scorer.span_risks(s, lp, ent, ranges)
    limit = text_length if text_length is not None else max((end for _, end in chars), default=0)
    return [
        SpanRisk(start, min(end, limit), risk)
        for (start, end), risk in zip(chars, risks, strict=True)
        if start < limit
    ]


class SentenceStream:
    """The sentences of an answer while it streams, each scored as soon as it is final.

    A sentence is final once the delivered text after it holds at least
    `MIN_SENTENCE_CHARS` characters of what follows (a shorter tail could still join it when
    the answer ends there: `sentence_spans`), so about three tokens after its full stop.
    Every sentence it reports is one of the final answer's `scored_spans`, with the same
    offsets and the same risk; the last sentence is final only in those.

        stream = SentenceStream(scorer)
        new = stream.push(decoded, delivered, s, logprob, entropy)   # per token
        stream.riskiest                                              # SpanRisk | None
    """

    def __init__(self, scorer: RiskScorer) -> None:
        self._scorer = scorer
        self._offsets = TokenOffsets()
        self._starts: list[int] = []
        self._values: list[tuple[float, float, float]] = []
        self._settled = 0  # sentences of the delivered text already final
        self.riskiest: SpanRisk | None = None

    def push(
        self, decoded: str, delivered: str, token_logit: float, logprob: float, entropy: float
    ) -> list[SpanRisk]:
        """Add one token: ``decoded``, the answer decoded up to and including it;
        ``delivered``, the part of it sent so far (never a possible stop string's start).
        Returns the sentences that became final with it (usually none)."""
        self._starts.append(self._offsets.next_start)
        self._offsets.push(decoded)
        self._values.append((token_logit, logprob, entropy))
        sentences = sentence_spans(delivered)
        final: list[SpanRisk] = []
        for index in range(self._settled, len(sentences) - 1):
            after = sentences[index - 1][1] if index else None
            first = 0 if after is None else bisect_left(self._starts, after)
            stop = bisect_left(self._starts, sentences[index][1])
            if stop > first:  # a sentence no token starts in is not a span
                final.append(SpanRisk(*sentences[index], self._risk(first, stop)))
        self._settled = max(self._settled, len(sentences) - 1)
        for span in final:
            if self.riskiest is None or span.risk > self.riskiest.risk:
                self.riskiest = span
        return final

    def token_values(self) -> np.ndarray:
        """``[tokens, 3]``: each pushed token's probe logit, log-prob and entropy."""
        return np.asarray(self._values, dtype=np.float64).reshape(-1, 3)

    def _risk(self, first: int, stop: int) -> float:
        s, lp, ent = np.asarray(self._values[first:stop], dtype=np.float64).T
        return self._scorer.span_risks(s, lp, ent, [(0, stop - first)])[0]
