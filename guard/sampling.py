"""Sampling and detokenisation for the decode loop: per-row parameters, next-token choice,
and stop strings over incrementally decoded text.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1)
    next_ids = sample_next(raw_logits, [params], [generator])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. ``temperature == 0`` is greedy; ``abort`` enables the
    policy's mid-answer abort (streams); ``ignore_eos`` forces ``max_tokens`` tokens."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    abort: bool = False
    ignore_eos: bool = False  # never sample an end token (benchmarks: a fixed answer length)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p must lie in (0, 1]")


# Below float32's smallest normal number a temperature cannot divide the logits.
SMALLEST_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


def sample_next(
    raw: torch.Tensor,
    rows: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    end_ids: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Next token per row from raw logits ``[batch, vocab]``: greedy or sampled. ``[batch]``.

    ``raw`` is never modified: the statistics are read from it afterwards.
    """
    forced = [i for i, params in enumerate(rows) if params.ignore_eos]
    if forced and end_ids:
        raw = raw.clone()
        raw[
            torch.as_tensor(forced)[:, None], torch.as_tensor(sorted(end_ids))[None, :]
        ] = -torch.inf
    chosen = raw.argmax(dim=-1)
    for i, (params, generator) in enumerate(zip(rows, generators, strict=True)):
        if params.temperature < SMALLEST_TEMPERATURE:  # greedy: sampling's limit as T -> 0
            continue
        row = raw[i].float()
        logits = (row - row.max()) / params.temperature  # <= 0: no overflow at tiny T
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        chosen[i] = torch.multinomial(probs, 1, generator=generator)[0]
    return chosen


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextTracker:
    """Incremental detokenisation with stop strings: what is safe to send, and when to stop."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = [stop for stop in stops if stop]
        self._ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly safe text."""
        self._ids.append(token_id)
        text = str(self._tokenizer.decode(self._ids, skip_special_tokens=True))
        text, self.stopped = cut_at_stop(text, self._stops)
        self.text = text
        safe = len(text)
        if not self.stopped:
            safe -= max(
                (k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])),
                default=0,
            )
            if text.endswith("\ufffd"):  # half a multi-byte character so far
                safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent : safe], safe
        return delta

    @property
    def delivered(self) -> str:
        """The text sent so far (never the start of a possible stop string)."""
        return self.text[: self.sent]

    def flush(self) -> str:
        """The rest of the text, at the end of the answer."""
        rest, self.sent = self.text[self.sent :], len(self.text)
        return rest
