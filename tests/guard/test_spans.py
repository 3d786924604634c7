"""Where the risk is: an answer's sentences as character spans, each with the risk of its
tokens alone, the same from live generation and from teacher-forced scoring, and the same
while streaming (each sentence as soon as it is final) as in the final answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guard.decoding import SamplingParams, TextTracker, TokenEvent
from guard.forcing import teacher_force
from guard.generation import GuardedModel
from guard.probe import load_probe
from guard.results import Decision
from guard.scoring import AnswerStats
from guard.settings import GuardSettings
from guard.spans import SentenceStream, answer_sentences, scored_spans
from tests.fixtures.models import tiny_loaded
from tests.fixtures.probes import write_probe

ANSWER = "Paris is a big city. It is the capital of France, Dr. Smith said. Rome is old."


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> GuardedModel:
    tiny = tiny_loaded()
    return GuardedModel(tiny, load_probe(write_probe(tmp_path_factory.mktemp("probe"), tiny)))


def test_scored_answer_has_one_span_per_sentence(guarded: GuardedModel) -> None:
    result = guarded.score(question="Tell me about Paris.", answer=ANSWER)
    texts = [ANSWER[span.start : span.end] for span in result.spans]
    assert texts == [
        "Paris is a big city.",
        "It is the capital of France, Dr. Smith said.",
        "Rome is old.",
    ]
    assert all(0.0 <= span.risk <= 1.0 for span in result.spans)
    assert len({round(span.risk, 9) for span in result.spans}) == 3  # each its own tokens


def test_a_single_sentence_is_scored_as_the_whole_answer(guarded: GuardedModel) -> None:
    result = guarded.score(question="Capital of France?", answer="It is Paris, in France.")
    assert [(s.start, s.end) for s in result.spans] == [(0, len("It is Paris, in France."))]
    assert result.risk is not None
    assert result.spans[0].risk == pytest.approx(result.risk, abs=1e-12)


def test_span_risks_are_the_risks_of_their_tokens_alone(guarded: GuardedModel) -> None:
    """A sentence's risk is the answer risk of its tokens alone: recomputed here from a
    teacher-forced pass, pooled over each sentence's tokens."""
    prompt = guarded.encode_chat([{"role": "user", "content": "Tell me about Paris."}])
    ids = guarded.encode_answer(ANSWER)
    result = guarded.score_ids(prompt, ids)
    scorer = guarded.scorer
    assert scorer is not None
    trace = teacher_force(
        guarded.loaded.model, [prompt], [ids], guarded.pad_id, scorer.neuron_selection()
    )[0]
    logits = scorer.measure(scorer.flatten(trace.cett))[:, 0].double().numpy()
    logprobs, entropies = trace.logprobs.double().numpy(), trace.entropies.double().numpy()
    _, ranges = answer_sentences(guarded.loaded.tokenizer, ids)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(ids)  # the ranges tile the tokens
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    expected = [
        scorer.answer_risk(AnswerStats.from_tokens(logits[a:b], logprobs[a:b], entropies[a:b]))
        for a, b in ranges
    ]
    assert [span.risk for span in result.spans] == pytest.approx(expected, abs=1e-6)


def test_generated_spans_equal_teacher_forced_spans(guarded: GuardedModel) -> None:
    for question in ("Tell me about Paris.", "Hi", "Describe the Nile in detail."):
        prompt = guarded.encode_chat([{"role": "user", "content": question}])
        generated = guarded.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0))
        assert generated.spans, "a guarded answer has at least one span"
        assert all(0 <= s.start < s.end <= len(generated.text) for s in generated.spans)
        scored = guarded.score_ids(prompt, generated.token_ids)
        assert [(s.start, s.end) for s in scored.spans] == [
            (s.start, s.end) for s in generated.spans
        ]
        for live, forced in zip(generated.spans, scored.spans, strict=True):
            assert live.risk == pytest.approx(forced.risk, abs=1e-4)


def test_unguarded_answers_have_no_spans() -> None:
    unguarded = GuardedModel(tiny_loaded(), None)
    assert unguarded.score(question="Capital of France?", answer=ANSWER).spans == []


STREAMED = [
    ANSWER,
    ANSWER + " Yes.",  # a short tail joins the last sentence: that one is final only at the end
    "He was born in Zürich in 1901. He wrote “Le Café” in 1930! Was it good? Nobody knows it.",
    "One. Two. Three. Four. Five words here. And then no full stop at all",
    "No. 5 is a perfume, see Fig. 3 of the U.S. report. It sold well.\n\nThe end came soon.",
    "   ",
]


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize("stop", [None, "Nobody"])
def test_streamed_sentences_are_final_spans(
    guarded: GuardedModel, text: str, stop: str | None
) -> None:
    """Token by token, as a stream delivers them: every sentence `SentenceStream` reports
    is one of the final `scored_spans`, with the same offsets and risk, reported as soon
    as 12 characters of the next sentence follow it; its riskiest is the final riskiest
    unless that is the last sentence."""
    scorer, tokenizer = guarded.scorer, guarded.loaded.tokenizer
    assert scorer is not None
    ids = guarded.encode_answer(text)
    values = np.random.default_rng(len(text)).normal(size=(len(ids), 3))
    values[:, 1] = -np.abs(values[:, 1])  # log-probs
    stream, tracker = SentenceStream(scorer), TextTracker(tokenizer, [stop] if stop else [])
    reported, after = [], {}
    for t, token_id in enumerate(ids):
        tracker.push(token_id)
        for span in stream.push(tracker.text, tracker.delivered, *values[t]):
            reported.append(span)
            after[span] = tracker.delivered[span.end :].strip()
        if tracker.stopped:
            break
    final = scored_spans(scorer, tokenizer, ids, *values.T, text_length=len(tracker.text))
    assert all(span in final for span in reported)
    assert reported == final[: len(reported)]  # in order, none skipped
    longest_token = max(len(tokenizer.decode([i])) for i in ids)
    for span in reported:  # final once 12 characters (one token more at most) follow it
        assert 12 <= len(after[span]) <= 12 + longest_token
    if final[:-1]:
        assert len(reported) >= len(final) - 1 or stop is not None
        assert stream.riskiest == max(reported, key=lambda span: span.risk)
    assert np.allclose(stream.token_values(), values[: len(stream.token_values())])


def test_stream_chunks_carry_the_riskiest_final_sentence(guarded: GuardedModel) -> None:
    """Through the decode loop: each event's riskiest sentence is final (one of the
    answer's spans, same offsets and risk) and never less risky than the one before."""
    checked = 0
    for question in ("Tell me about Paris.", "Describe the Nile in detail.", "Who was he?"):
        events: list[TokenEvent] = []
        prompt = guarded.encode_chat([{"role": "user", "content": question}])
        params = SamplingParams(max_tokens=80, temperature=0.0)
        result = guarded.generate(prompt, params, on_event=events.append)
        shown = [event.riskiest_span for event in events if event.riskiest_span is not None]
        assert all(span in result.spans for span in shown)
        assert all(b.risk >= a.risk for a, b in zip(shown, shown[1:], strict=False))
        checked += len(shown)
        if len(result.spans) > 1 and shown:
            assert shown[-1] == max(result.spans[:-1], key=lambda span: span.risk)
    assert checked, "some answer had a sentence final before its end"


def test_abort_on_sentences_acts_on_a_final_sentence(guarded: GuardedModel, tmp_path: Path) -> None:
    """With GUARD_ABORT_ON_SENTENCES a stream stops at the token that makes a sentence
    final with a risk at the abort threshold, while the running risk is below it; without
    it, that sentence stops nothing."""
    tiny, params = guarded.loaded, SamplingParams(max_tokens=80, temperature=0.0, abort=True)
    found = None
    for question in ("Describe the Nile in detail.", "Tell me about Paris.", "Who was he?", "Hi"):
        prompt = guarded.encode_chat([{"role": "user", "content": question}])
        events: list[TokenEvent] = []
        guarded.generate(prompt, params, on_event=events.append)
        for before, event in zip([None, *events], events, strict=False):
            span, shown = event.riskiest_span, before and before.riskiest_span
            if span is not None and span != shown and span.risk > (event.running_risk or 1.0):
                found = (prompt, event.index, span.risk)  # a new riskiest sentence, final here
                break
        if found:
            break
    assert found is not None, "some answer has a sentence riskier than its running risk"
    prompt, index, line = found  # the running rule cannot fire before this token
    probe = load_probe(write_probe(tmp_path, tiny, abort=line, abort_min_tokens=index + 1))
    settings = GuardSettings(abort_on_sentences=True)
    on = GuardedModel(tiny, probe, overrides=settings).generate(prompt, params)
    assert on.aborted and on.finish_reason == "content_filter" and len(on.tokens) == index + 1
    assert on.decision is Decision.ABSTAIN
    off = GuardedModel(tiny, probe, overrides=GuardSettings()).generate(prompt, params)
    assert len(off.tokens) > index + 1
