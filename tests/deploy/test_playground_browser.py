"""The playground in headless Chromium against a running guard: the page loads, a question
is submitted, risk-shaded tokens and a verdict appear, matching what the API says."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.browser import ask, chromium, page_state
from tests.deploy.live import SERVED_NAME, tiny_app
from tests.fixtures.servers import serve_in_thread

pytestmark = pytest.mark.timeout(300)
QUESTION = "Who wrote the novel Middlemarch?"


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_in_thread(tiny_app(tmp_path_factory.mktemp("ui") / "probe")) as base:
        yield base


def streamed_verdict(
    guard: str, max_tokens: int | None = None, question: str = QUESTION
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The same question through the API: (tokens, final guard object)."""
    body = {"model": SERVED_NAME, "temperature": 0, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]}  # fmt: skip
    tokens: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    with httpx.stream("POST", f"{guard}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            tokens += chunk["guard"]["tokens"]
            if chunk["guard"].get("decision"):
                final = chunk["guard"]
    return tokens, final


def rgb(color: str) -> tuple[int, ...]:
    return tuple(int(c) for c in re.findall(r"\d+", color)[:3])


def test_a_question_streams_shaded_tokens_and_a_verdict(guard: str, tmp_path: Path) -> None:
    with chromium() as driver:
        ask(driver, guard, QUESTION)
        shot = tmp_path / "playground.png"
        assert driver.save_screenshot(str(shot))
        shown = page_state(driver)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    tokens, final = streamed_verdict(guard)

    assert shown["decision"] == final["decision"] in {"pass", "flag", "abstain"}
    assert shown["status"] == "Done."
    assert float(shown["risk"]) == pytest.approx(final["risk"], abs=0.005)
    assert [t["text"] for t in shown["tokens"]] == [t["text"] for t in tokens]
    assert [t["risk"] for t in shown["tokens"]] == pytest.approx([t["risk"] for t in tokens])
    assert shown["layers"] == sorted(final["layers"], key=int)
    assert final["scope"] is None and shown["scope"] == "judged (this probe has no scope gate)"
    # every token is shaded, and a riskier token is redder (more red, less green)
    colors = {t["risk"]: rgb(t["color"]) for t in shown["tokens"]}
    assert all(c != (0, 0, 0) for c in colors.values())
    low, high = colors[min(colors)], colors[max(colors)]
    if max(colors) - min(colors) > 0.1:
        assert high[0] - high[1] > low[0] - low[1]


def test_the_riskiest_sentence_is_outlined(tmp_path: Path) -> None:
    """A multi-sentence answer (the tiny model's to this question has four): exactly the
    tokens of the verdict's ``riskiest_span`` are outlined, and the note names its risk."""
    app, question = tiny_app(tmp_path / "probe", max_new_tokens=64), "Tell me about Paris."
    with serve_in_thread(app) as base, chromium() as driver:
        driver.get(f"{base}/ui")
        driver.execute_script("document.getElementById('max-tokens').value = 64;")
        ask(driver, base, question, reload=False)
        shown = page_state(driver)
        tokens, final = streamed_verdict(base, max_tokens=64, question=question)
    riskiest = final["riskiest_span"]
    assert len(final["spans"]) >= 2 and riskiest in final["spans"]
    inside, offset = [], 0
    for token in tokens:
        inside.append(offset < riskiest["end"] and offset + len(token["text"]) > riskiest["start"])
        offset += len(token["text"])
    assert [t["outlined"] for t in shown["tokens"]] == inside and any(inside)
    assert f"Riskiest sentence (outlined): risk {riskiest['risk']:.3f}." in shown["note"]


@pytest.mark.parametrize("scope_bias", [-50.0, 50.0])
def test_the_scope_verdict_is_shown(tmp_path: Path, scope_bias: float) -> None:
    """Thresholds at 0 abstain on every judged answer: out of scope the page says the
    answer was not judged and why its risk does not count; in scope, that it was judged."""
    app = tiny_app(tmp_path / "probe", flag=0.0, abstain=0.0, scope_bias=scope_bias)
    with serve_in_thread(app) as base, chromium() as driver:
        ask(driver, base, QUESTION)
        shown = page_state(driver)
    if scope_bias < 0:
        assert shown["decision"] == "pass" and shown["scope"].startswith("not judged (p = ")
        assert "does not count" in shown["scope"] and "outside the probe's scope" in shown["note"]
    else:
        assert shown["decision"] == "abstain" and shown["scope"].startswith("judged: ")


def test_an_api_error_is_shown_not_swallowed(guard: str) -> None:
    with chromium() as driver:
        driver.get(f"{guard}/ui")
        driver.execute_script("document.getElementById('max-tokens').value = 4000;")
        with pytest.raises(AssertionError, match="max_tokens 4000 exceeds"):
            ask(driver, guard, QUESTION, reload=False)
        assert page_state(driver)["badge"] == "no verdict"


def test_an_unguarded_server_is_shown_as_such() -> None:
    with serve_in_thread(tiny_app(None)) as base, chromium() as driver:
        ask(driver, base, QUESTION)
        shown = page_state(driver)
    assert shown["badge"] == "unguarded" and shown["tokens"]
    assert all(t["color"] == "rgba(0, 0, 0, 0)" for t in shown["tokens"])  # nothing shaded
    assert shown["layers"] == []


@pytest.mark.parametrize(
    ("thresholds", "badge", "note", "withdrawn"),
    [
        ({"flag": 0.01, "abstain": 0.02, "abort": 0.03, "abort_min_tokens": 2},
         "abstain (stopped mid-answer)", "Generation was stopped", False),
        ({"flag": 0.01, "abstain": 0.02}, "abstain", "must withdraw", True),
    ],
    ids=["aborted-mid-stream", "abstained-at-the-end"],
)  # fmt: skip
def test_abstentions_are_shown_as_the_guard_decided(
    tmp_path: Path, thresholds: dict[str, Any], badge: str, note: str, withdrawn: bool
) -> None:
    with serve_in_thread(tiny_app(tmp_path / "probe", **thresholds)) as base, chromium() as driver:
        ask(driver, base, QUESTION)
        shown = page_state(driver)
        classes = driver.find_element("id", "answer").get_attribute("class") or ""
        shown_note = driver.find_element("id", "note").text
    assert shown["decision"] == "abstain" and shown["badge"] == badge
    assert note in shown_note
    assert ("withdrawn" in classes) is withdrawn
    if "abort" in thresholds:  # stopped right after the minimum number of tokens
        assert len(shown["tokens"]) == thresholds["abort_min_tokens"]
