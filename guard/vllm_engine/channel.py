"""The channel from the worker's capture back to the API process: one frame per step.

vLLM hands only its own outputs back from the worker, so the capture's frames
(`guard.vllm_engine.capture.StepCapture`) travel on their own ZeroMQ PUSH -> PULL pair:
the API process binds an ``ipc://`` socket in a private temporary directory, the worker
extension connects to it (`guard.vllm_engine.worker`). Frames are msgpack (msgspec):
numbers and lists only, decoded into plain Python values; nothing is unpickled. The same
channel serves both process layouts (vLLM's engine in this process or in its own).

`FrameReader` (API side) merges the frames per request into a `Received`, keyed by
response index, so a token is fed once both vLLM's output for it and the frame of the step
that sampled it have arrived, whichever came first (`FrameReader.wait`).

    reader = FrameReader()                       # API process
    publish = FramePublisher(reader.address)     # worker: publish(frame) per step
    reader.expect("req-1"); reader.drain(); got = reader.received("req-1")
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from guard.errors import CaptureError

Frame = dict[str, Any]


@dataclass
class Received:
    """What the capture measured for one request so far.

    ``sampled[k]``: (token id, log-prob, entropy) of response token ``k``, from the step
    that sampled it; ``measured[k]``: `RiskScorer.measure` row of response token ``k``,
    from the step that fed it; ``forced[k]``: (log-prob, entropy) of a teacher-forced answer
    token; ``hidden`` / ``residual``: the gates' inputs at the last prompt token;
    ``prompt_logit``: a max-pooled knowledge gate's logit, the max over every prompt token."""

    sampled: dict[int, tuple[int, float, float]] = field(default_factory=dict)
    measured: dict[int, list[float]] = field(default_factory=dict)
    forced: dict[int, tuple[float, float]] = field(default_factory=dict)
    hidden: list[float] | None = None
    residual: list[float] | None = None
    prompt_logit: float | None = None

    def has_token(self, index: int, fed: int | None) -> bool:
        """Whether token ``index``'s sample has arrived, and the measure of token ``fed``
        (the token fed in that step; None: none needed)."""
        return index in self.sampled and (fed is None or fed in self.measured)

    def update(self, values: dict[str, Any]) -> None:
        """Merge one step's values for this request (a frame's entry)."""
        if "sampled" in values:
            index, token, logprob, entropy = values["sampled"]
            self.sampled[int(index)] = (int(token), float(logprob), float(entropy))
        for index, *row in values.get("measured", ()):
            self.measured[int(index)] = [float(v) for v in row]
        for index, logprob, entropy in values.get("forced", ()):
            self.forced[int(index)] = (float(logprob), float(entropy))
        if "hidden" in values:
            self.hidden = values["hidden"]
        if "residual" in values:
            self.residual = values["residual"]
        if "prompt_logit" in values:
            self.prompt_logit = float(values["prompt_logit"])


class FramePublisher:
    """The worker's end: sends each frame to the API process's `FrameReader`."""

    def __init__(self, address: str) -> None:
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._encoder = msgspec.msgpack.Encoder()

    def __call__(self, frame: Frame) -> None:
        self._socket.send(self._encoder.encode(frame), copy=False)

    def close(self) -> None:
        self._socket.close()


class FrameReader:
    """The API process's end: receives frames, keeps each expected request's `Received`,
    drops frames of requests it does not (or no longer) expect."""

    def __init__(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="hguard-vllm-"))  # mode 0700
        self.address = f"ipc://{self._directory / 'frames'}"
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._decoder = msgspec.msgpack.Decoder()
        self._received: dict[str, Received] = {}
        self._seconds = 0.0
        self.merged = 0  # frames merged so far: one per vLLM step
        self.tail_steps = 0  # of them, steps that skipped what the guard does not read

    def expect(self, req_id: str) -> Received:
        """Start keeping ``req_id``'s values (before its first step can run)."""
        return self._received.setdefault(req_id, Received())

    def forget(self, req_id: str) -> None:
        self._received.pop(req_id, None)

    def drain(self, timeout_s: float = 0.0) -> int:
        """Merge every frame that has arrived (waiting up to ``timeout_s`` for the
        first); the number merged."""
        merged = 0
        while self._socket.poll(int(timeout_s * 1000) if merged == 0 else 0):
            frame = self._decoder.decode(self._socket.recv(copy=False))
            self._seconds += float(frame.get("seconds", 0.0))
            self.tail_steps += bool(frame.get("tail", False))
            for req_id, values in frame.get("requests", {}).items():
                received = self._received.get(req_id)
                if received is not None:
                    received.update(values)
            merged += 1
        self.merged += merged
        return merged

    def wait(self, ready: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        """Drain until ``ready()``; `CaptureError` naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaptureError(f"the worker sent no capture for {what} in {timeout_s:.0f} s")
            self.drain(min(left, 0.5))

    def pop_seconds(self) -> float:
        """Seconds the worker's hooks spent, over the frames merged since the last call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def close(self) -> None:
        self._socket.close()
        shutil.rmtree(self._directory, ignore_errors=True)
