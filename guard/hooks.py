"""Forward hooks as context managers: the one mechanism every capture of the guard uses.

A capture builds its list of `Hook`s first (every module already resolved, so a bad name
fails before anything is registered), then `ModelHooks` claims the model for that kind of
capture, registers the hooks with PyTorch's public API, and removes every handle on exit,
in reverse order, also after an exception; exiting twice is harmless.

    hooks = ModelHooks(model, "final hidden state", [Hook(head, record, pre=True)])
    with hooks:
        model(input_ids)

One capture per model and kind at a time: hooks fire for every forward pass through a
module, so two overlapping captures of the same kind (two threads) would record each
other's tokens. Captures of different kinds nest (the decode loop reads neurons and the
final hidden state in the same pass).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from guard.errors import CaptureError

HookFn = Callable[..., Any]

_ACTIVE: dict[tuple[int, str], int] = {}
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Hook:
    """One hook: a forward hook on ``module`` (``pre``: a forward pre-hook, with the call's
    keyword arguments when ``with_kwargs``)."""

    module: nn.Module
    fn: HookFn
    pre: bool = False
    with_kwargs: bool = False

    def register(self) -> RemovableHandle:
        if self.pre:
            return self.module.register_forward_pre_hook(self.fn, with_kwargs=self.with_kwargs)
        return self.module.register_forward_hook(self.fn, with_kwargs=self.with_kwargs)


class ModelHooks:
    """Hooks on one model's modules, registered together on enter and removed on exit.

    Captures subclass it and call ``super().__init__`` once their hooks are resolved."""

    def __init__(self, model: nn.Module, kind: str, hooks: Sequence[Hook]) -> None:
        self._key = (id(model), kind)
        self._kind = kind
        self._hooks = list(hooks)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Self:
        with _ACTIVE_LOCK:
            if self._key in _ACTIVE:
                raise CaptureError(
                    f"another {self._kind} capture is active on this model: forward passes "
                    "through one model must be serialised (batch requests instead of "
                    "overlapping them)"
                )
            _ACTIVE[self._key] = id(self)
        try:
            for hook in self._hooks:
                self._handles.append(hook.register())
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()  # reverse order of registration
        with _ACTIVE_LOCK:
            if _ACTIVE.get(self._key) == id(self):
                del _ACTIVE[self._key]


class PositionCapture(ModelHooks):
    """A capture that keeps one ``[batch, seq, hidden]`` tensor of the newest pass and hands
    out one position per row (`take`). Subclasses record with `_keep`."""

    _hidden: torch.Tensor | None = None
    _missing = "no forward pass reached the captured module"

    def _keep(self, hidden: torch.Tensor) -> None:
        self._hidden = hidden.detach()

    def take(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, hidden]`` float32 from the newest pass: the last position of every
        row, or ``positions[i]`` of row ``i``. Clears what it returns."""
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise CaptureError(self._missing)
        if positions is None:
            return hidden[:, -1].float()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, positions.to(hidden.device)].float()
