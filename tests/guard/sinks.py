"""A generation sink for tests: keeps every event and the result; can play a client that
goes away."""

from __future__ import annotations

from guard.decoding import TokenEvent
from guard.results import GenerationResult


class Sink:
    """Keeps a request's events; cancels (the client went away) after ``cancel_after`` tokens."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.events: list[TokenEvent] = []
        self.result: GenerationResult | None = None
        self.cancel_after = cancel_after

    def on_token(self, event: TokenEvent) -> None:
        self.events.append(event)

    def on_finish(self, result: GenerationResult) -> None:
        self.result = result

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.events) >= self.cancel_after
