"""The capture's channel back to the API process, without an engine: frames merge per
request by response index whatever order they arrive in; frames of requests nobody
expects are dropped; a frame that never comes is a `CaptureError`, not a hang."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guard.errors import CaptureError
from guard.vllm_engine.channel import FramePublisher, FrameReader


@pytest.fixture
def channel() -> Iterator[tuple[FrameReader, FramePublisher]]:
    reader = FrameReader()
    publisher = FramePublisher(reader.address)
    try:
        yield reader, publisher
    finally:
        publisher.close()
        reader.close()


def test_frames_merge_by_index_in_any_order(channel: tuple[FrameReader, FramePublisher]) -> None:
    reader, publish = channel
    got = reader.expect("a")
    # the step that samples token 1 and feeds token 0 arrives before the prompt's step
    publish({"seconds": 0.25, "requests": {
        "a": {"sampled": [1, 42, -0.5, 2.0], "measured": [[0, 0.1, 0.2, 0.3]]},
        "stranger": {"sampled": [0, 7, -1.0, 1.0]},
    }})  # fmt: skip
    publish({"seconds": 0.5, "requests": {
        "a": {"sampled": [0, 9, -0.25, 1.5], "hidden": [1.0, 2.0], "residual": [3.0]},
    }})  # fmt: skip
    reader.wait(lambda: got.has_token(0, None) and got.has_token(1, 0), "tokens 0 and 1")
    assert got.sampled == {0: (9, -0.25, 1.5), 1: (42, -0.5, 2.0)}
    assert got.measured == {0: [0.1, 0.2, 0.3]}
    assert got.hidden == [1.0, 2.0] and got.residual == [3.0]
    assert reader.pop_seconds() == pytest.approx(0.75) and reader.pop_seconds() == 0.0
    assert not got.has_token(2, None) and not got.has_token(1, 1)


def test_frames_of_unknown_or_forgotten_requests_are_dropped(
    channel: tuple[FrameReader, FramePublisher],
) -> None:
    reader, publish = channel
    kept = reader.expect("kept")
    reader.expect("gone")
    reader.forget("gone")
    publish(
        {"requests": {"gone": {"sampled": [0, 1, 0.0, 0.0]}, "kept": {"forced": [[0, -1.0, 2.0]]}}}
    )
    reader.wait(lambda: 0 in kept.forced, "the forced token")
    assert kept.forced == {0: (-1.0, 2.0)}
    assert reader.expect("gone").sampled == {}  # a new request of that id starts empty


def test_a_frame_that_never_comes_fails_with_a_capture_error(
    channel: tuple[FrameReader, FramePublisher],
) -> None:
    reader, _ = channel
    got = reader.expect("a")
    with pytest.raises(CaptureError, match="token 3 of a"):
        reader.wait(lambda: got.has_token(3, None), "token 3 of a", timeout_s=0.3)
