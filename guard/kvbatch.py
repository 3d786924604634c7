"""The model side of a running batch: KV caches, attention masks, positions, forward passes.

Rows are left-padded to one width: row ``i``'s tokens fill the last columns of ``mask[i]``
and of every cache layer's keys and values ``[rows, kv_heads, width, head_dim]``. Padding
is masked out, so what the cache holds there never reaches a real token (prompt padding
holds whatever the prompt pass computed there, merge padding holds zeros). Every row ends
in the last column, so a decode step appends one column for all rows at once.

- `PromptBatch`: new rows' prompts, fed into their own cache a chunk of columns at a time
  (chunked prefill), then handed over as a `KVBatch` (`state`); a `Prefix` (the keys and
  values of an earlier prompt) starts the rows whose prompts begin with its tokens;
- `KVBatch`: the running rows; `grow` makes room for the next token, `decode` runs a step,
  `feed_until` a step that stops after a given module (no LM head);
- `KVBatch.select`: rows leave; leading columns that became padding in every row go too;
- `merge`: rows join: the narrower side is left-padded with masked zeros along the sequence
  axis, then both are concatenated along the batch axis.

transformers' `DynamicCache` is used through its public surface where it has one:
iteration (each layer's ``keys, values, sliding window``), ``batch_select_indices``,
``get_seq_length``, the layout its docstring states (``[batch, heads, seq, head_dim]`` per
layer) and a cache built without a model config holding one full (non-sliding)
`DynamicLayer` per model layer, as the decode loop has always used it. Building a cache
from given tensors without copying them has no public method: `_cache_of` names the two
internals it relies on.

    prompts = PromptBatch.of([[5, 6, 7], [8]], pad_id=0, device=cpu)
    logits = prompts.feed(model, columns=None)      # [rows, vocab] at the last positions
    running = prompts.state() if running is None else merge(running, prompts.state())
    running.grow(); logits = running.decode(model, next_ids)   # one decode step
    running.select([0, 2])                                    # rows 1 and 3 left
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from guard.forcing import position_ids_for
from guard.hooks import Hook, ModelHooks
from guard.knowledge import masked_max
from guard.model import left_pad


def cache_argument(model: nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values``."""
    model_class = type(model)
    keyword = _CACHE_KEYWORDS.get(model_class)
    if keyword is None:  # inspecting a signature costs more than a small decode step's hooks
        parameters = inspect.signature(model_class.forward).parameters
        keyword = _CACHE_KEYWORDS[model_class] = (
            "cache" if "cache" in parameters else "past_key_values"
        )
    return keyword


_CACHE_KEYWORDS: dict[type, str] = {}


def _lm_logits(model: nn.Module, kwargs: dict[str, object]) -> torch.Tensor:
    """The model's logits at the last position of each row: ``[rows, vocab]``."""
    logits: torch.Tensor = model(**kwargs, logits_to_keep=1).logits
    return logits[:, -1, :]


@dataclass
class KVBatch:
    """A batch's KV cache with its ``mask`` ``[rows, width]`` (1 = token, 0 = left padding)
    and ``positions`` ``[rows, 1]``, the position id of each row's newest token."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def grow(self) -> None:
        """Make room for one more token per row: a mask column and the next positions."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        self.positions = self.positions + 1

    def _inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict[str, object]:
        return {
            "input_ids": input_ids, "attention_mask": self.mask, "position_ids": self.positions,
            cache_argument(model): self.cache, "use_cache": True,
        }  # fmt: skip

    def decode(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids`` ``[rows, 1]`` (after `grow`); the next-token logits."""
        return _lm_logits(model, self._inputs(model, input_ids))

    def feed_until(self, model: nn.Module, input_ids: torch.Tensor, module: nn.Module) -> None:
        """Feed ``input_ids`` only as far as ``module``: no layer after it, no LM head. The
        cache is incomplete afterwards (its later layers lack the column): for a batch's
        last pass only. Hooks on ``module`` registered before this call run.

        The whole model is called (not its ``base_model``), so hooks on the model itself
        run as in every other pass (`NeuronCapture` reads the batch shape there)."""
        run_until(model, self._inputs(model, input_ids), module)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep`` (in that order), then drop all-padding columns."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        start = int(self.mask.any(dim=0).long().argmax())  # the first column with a token
        if start > 0:
            self.cache = _cache_of((k[..., start:, :], v[..., start:, :]) for k, v in _layers(self))
            self.mask = self.mask[:, start:]


def merge(first: KVBatch, second: KVBatch) -> KVBatch:
    """``first``'s rows, then ``second``'s, in one batch as wide as the wider of the two."""
    width = max(first.width, second.width)
    layers = zip(_layers(first), _layers(second), strict=True)
    cache = _cache_of(
        (_stack(k1, k2, width), _stack(v1, v2, width)) for (k1, v1), (k2, v2) in layers
    )
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (first.mask, second.mask)])
    return KVBatch(cache, mask, torch.cat([first.positions, second.positions]))


@dataclass(frozen=True)
class Prefix:
    """A prompt's keys and values, kept so that later prompts beginning with the same tokens
    (a chat template's system prompt) skip that part of their prefill: ``tokens`` and per
    layer ``(keys, values)`` ``[1, heads, len(tokens), head_dim]``, positions from 0; and,
    for a max-pooled knowledge gate, its logit at each of those tokens ``[len(tokens)]``
    (the prompts that reuse them pool over them too)."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    gate: torch.Tensor | None = None

    def shared(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` this holds, leaving at least one to feed
        (its pass gives the first logits)."""
        limit, n = min(len(self.tokens), len(prompt) - 1), 0
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        return n


@dataclass
class PromptBatch:
    """Prompts ``ids``, ``mask``, ``positions`` ``[rows, width]`` being fed into their own
    cache; ``fed`` columns so far.

    Without a prefix the prompts are left-padded. With a `Prefix`, row ``i`` is laid out
    ``[its shared tokens | padding | the rest]``: the first ``max(shared)`` columns come
    from the prefix's cache (rows sharing fewer tokens mask the remainder), the rest is fed,
    right-aligned. Positions skip the padding, so every token sits where it would alone.

    ``gate``: a max-pooled knowledge gate's logit per column ``[rows, width]``, kept as the
    columns are fed (`keep_gate`; the prefix's columns come with it), -inf where unknown."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache = field(default_factory=DynamicCache)
    fed: int = 0
    gate: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        prompts: list[list[int]],
        pad_id: int,
        device: torch.device,
        prefix: Prefix | None = None,
        shared: Sequence[int] | None = None,
    ) -> PromptBatch:
        """``shared[i]``: how many of ``prompts[i]``'s first tokens ``prefix`` holds."""
        skip = list(shared) if prefix is not None and shared is not None else [0] * len(prompts)
        ids, mask = left_pad([p[n:] for p, n in zip(prompts, skip, strict=True)], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        head = max(skip, default=0)
        if prefix is None or head == 0:
            return cls(ids, mask, position_ids_for(mask))
        rows = len(prompts)
        head_ids = torch.as_tensor(prefix.tokens[:head], device=device).expand(rows, head)
        held = torch.as_tensor(skip, device=device)[:, None]
        head_mask = torch.arange(head, device=device)[None, :] < held
        ids, mask = torch.cat([head_ids, ids], dim=1), torch.cat([head_mask.long(), mask], dim=1)
        cache = _cache_of(
            (k[..., :head, :].expand(rows, -1, -1, -1), v[..., :head, :].expand(rows, -1, -1, -1))
            for k, v in prefix.layers
        )
        batch = cls(ids, mask, position_ids_for(mask), cache, fed=head)
        if prefix.gate is not None:
            batch.keep_gate(0, prefix.gate[:head].to(device).expand(rows, head))
        return batch

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def completes(self, columns: int | None) -> bool:
        """Whether feeding ``columns`` more (None = all) completes the prompts."""
        return columns is None or self.fed + columns >= self.width

    def feed(self, model: nn.Module, columns: int | None) -> torch.Tensor | None:
        """Feed the next ``columns`` (None = the rest). Once the prompts are complete, the
        logits at their last positions ``[rows, vocab]``; before, None."""
        start = self.fed
        self.fed = self.width if columns is None else min(self.width, start + columns)
        kwargs = {
            "input_ids": self.ids[:, start : self.fed], "attention_mask": self.mask[:, : self.fed],
            "position_ids": self.positions[:, start : self.fed],
            cache_argument(model): self.cache, "use_cache": True,
        }  # fmt: skip
        logits = _lm_logits(model, kwargs)  # one position per row: the head costs little
        return logits if self.fed == self.width else None

    def keep_gate(self, start: int, logits: torch.Tensor) -> None:
        """Keep the gate's logits ``[rows, n]`` of columns ``start .. start + n``."""
        if self.gate is None:
            self.gate = torch.full(self.ids.shape, float("-inf"), device=logits.device)
        self.gate[:, start : start + logits.shape[1]] = logits.float()

    def gate_max(self) -> torch.Tensor:
        """Each row's max gate logit over its prompt's tokens ``[rows]``."""
        if self.gate is None:
            raise RuntimeError("no gate logits were kept for these prompts")
        return masked_max(self.gate, self.mask)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep``."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.ids.device)
        if self.cache.get_seq_length() > 0:
            self.cache.batch_select_indices(index)
        self.ids, self.mask = self.ids[index], self.mask[index]
        self.positions = self.positions[index]
        if self.gate is not None:
            self.gate = self.gate[index]

    def prefix(self, row: int) -> Prefix:
        """Row ``row``'s complete prompt as a `Prefix` for later prompts (copied out)."""
        columns = self.mask[row].nonzero().squeeze(-1)
        layers = tuple(
            (k[row : row + 1].index_select(-2, columns), v[row : row + 1].index_select(-2, columns))
            for k, v in _layers(self.state())
        )
        gate = None if self.gate is None else self.gate[row].index_select(0, columns)
        return Prefix(tuple(int(i) for i in self.ids[row, columns].tolist()), layers, gate)

    def state(self) -> KVBatch:
        """The complete prompts' model state, ready to decode or to merge into a batch."""
        if self.fed < self.width:
            raise RuntimeError(f"the prompts are fed {self.fed} of {self.width} columns")
        return KVBatch(self.cache, self.mask, self.positions[:, -1:])


def run_until(model: nn.Module, inputs: dict[str, object], module: nn.Module) -> None:
    """Call ``model(**inputs)`` only as far as ``module``: the pass ends once it has run
    (its hooks registered before this call included); nothing is returned."""
    stop = ModelHooks(model, "early stop", [Hook(module, _stop_forward)])
    with contextlib.suppress(_StopForward), stop:
        model(**inputs)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed layer has run."""


def _stop_forward(module: nn.Module, inputs: object, output: object) -> None:
    raise _StopForward


def _layers(kv: KVBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(keys, values)``, checked to be as wide as the mask."""
    layers = [(keys, values) for keys, values, *_ in kv.cache]
    for keys, _ in layers:
        if keys is None or keys.shape[-2] != kv.width:
            raise RuntimeError(
                f"a KV cache layer holds {None if keys is None else keys.shape[-2]} positions, "
                f"the mask {kv.width}: the cache is not a complete batch state"
            )
    return layers


def _stack(top: torch.Tensor, bottom: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, ..., seq, d]`` tensors one above the other, right-aligned in ``width``
    sequence positions with zeros to the left: each element written once."""
    rows, shape = top.shape[0], (top.shape[0] + bottom.shape[0], *top.shape[1:-2])
    out = top.new_empty((*shape, width, top.shape[-1]))
    for part, start in ((top, 0), (bottom, rows)):
        stop, pad = start + part.shape[0], width - part.shape[-2]
        out[start:stop, ..., :pad, :] = 0
        out[start:stop, ..., pad:, :] = part
    return out


def _cache_of(layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding the given per-layer ``(keys, values)`` themselves (no copy).

    Building it through the public constructor (``DynamicCache(ddp_cache_data)``) copies
    every tensor once more (``DynamicLayer.update`` concatenates onto an empty tensor):
    a join would then cost two copies of the whole cache, a third of a decode step on
    SmolLM2. So this relies on two internals of transformers 5: ``Cache.layers`` (the list
    of per-layer caches) and ``DynamicLayer.keys`` / ``.values`` (the tensors it holds,
    after ``lazy_initialization`` has set its device and dtype)."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache
