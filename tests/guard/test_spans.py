"""Where the risk is: an answer's sentences as character spans, each with the risk of its
tokens alone, the same from live generation and from teacher-forced scoring."""

from __future__ import annotations

import pytest

from guard.decoding import SamplingParams
from guard.forcing import teacher_force
from guard.generation import GuardedModel
from guard.probe import load_probe
from guard.scoring import AnswerStats
from guard.spans import answer_sentences
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
