"""Long answers claim by claim: sentence spans, token ranges, pooling, traces and the
knowledge probe (tiny random model, planted signals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guard.generation import GuardedModel
from guard.probe import load_probe
from guard.spans import answer_sentences, sentence_spans, sentence_token_ranges, token_char_spans
from probes.collect import AnswerRecord
from probes.knowledge import fit_knowledge_probe
from probes.longform import (
    load_traces,
    pooled_logits,
    save_traces,
    sentence_risks,
    trace_answers,
)
from probes.metrics import auroc
from tests.fixtures.models import tiny_loaded
from tests.fixtures.probes import write_probe


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        (
            "Blake Bourne is an actor. He was born in 1971 in Leeds. He won an award!",
            ["Blake Bourne is an actor.", "He was born in 1971 in Leeds.", "He won an award!"],
        ),
        (
            "Dr. J. Smith wrote it in 3.5 weeks. Then he left.",
            ["Dr. J. Smith wrote it in 3.5 weeks.", "Then he left."],
        ),
        (
            "It is in the U.S. state of Ohio. It has 2,000 people.",
            ["It is in the U.S. state of Ohio.", "It has 2,000 people."],
        ),
        ("Yes. The capital is Nova Haven.", ["Yes. The capital is Nova Haven."]),  # fragment joins
        ("First line here\nSecond line here", ["First line here", "Second line here"]),
        ("  No full stop at all  ", ["No full stop at all"]),
        ("", []),
    ],
)
def test_sentence_spans(text: str, sentences: list[str]) -> None:
    assert [text[a:b] for a, b in sentence_spans(text)] == sentences


def test_token_ranges_tile_the_tokens_and_hold_their_sentences() -> None:
    loaded = tiny_loaded()
    text = "The Velmora Accord was signed in 1848. It ended the war. Nobody remembers it now."
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    chars, ranges = answer_sentences(loaded.tokenizer, ids)
    assert len(chars) == len(ranges) == 3
    assert ranges[0][0] == 0 and ranges[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for (start, end), (a, b) in zip(chars, ranges, strict=True):
        decoded = loaded.tokenizer.decode(ids[a:b])
        assert decoded.strip() == text[start:end]
    spans = token_char_spans(loaded.tokenizer, ids)
    assert sentence_token_ranges(spans, []) == [(0, len(ids))]


def test_pooled_logits() -> None:
    s = np.array([0.0, 1.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    pooled = pooled_logits(s)
    assert pooled["mean"] == pytest.approx(1.6)
    assert pooled["max"] == 9.0
    assert pooled["topk"] == pytest.approx((9 + 5 + 1 + 1) / 4)
    assert pooled["window"] == pytest.approx(max(np.convolve(s, np.ones(8) / 8, "valid")))
    assert pooled_logits(np.array([2.0]))["window"] == 2.0  # shorter than the window


def test_sentence_risk_of_a_one_sentence_answer_is_the_served_risk(tmp_path: Path) -> None:
    loaded = tiny_loaded()
    probe = load_probe(write_probe(tmp_path / "probe", loaded, scope_bias=0.0))
    guarded = GuardedModel(loaded, probe)
    assert guarded.scorer is not None
    prompts = [guarded.encode_chat([{"role": "user", "content": q}]) for q in ("Who?", "Where?")]
    answers = [
        "Nova Haven is its capital.",
        "It is a small town. It lies on a wide river. It is very old.",
    ]
    records = [
        AnswerRecord(
            id=f"q{i}",
            question="q",
            answers=["x"],
            split="test",
            prompt_ids=p,
            response_ids=guarded.encode_answer(a),
            response=a,
            stopped=True,
            correct=False,
            alias=None,
            span=None,
        )  # fmt: skip
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    traces = trace_answers(loaded, guarded.scorer, records, batch_size=2)
    for record, trace in zip(records, traces, strict=True):
        served = guarded.score_ids(record.prompt_ids, record.response_ids)
        assert guarded.scorer.answer_risk(trace.stats()) == pytest.approx(served.risk, abs=1e-6)
        assert trace.prompt_hidden.shape == (loaded.model.config.hidden_size,)
    _, ranges = answer_sentences(loaded.tokenizer, records[0].response_ids)
    one = sentence_risks(guarded.scorer, traces[0], ranges)
    assert one.shape == (1,) and one[0] == pytest.approx(
        guarded.scorer.answer_risk(traces[0].stats())
    )
    _, ranges = answer_sentences(loaded.tokenizer, records[1].response_ids)
    three = sentence_risks(guarded.scorer, traces[1], ranges)
    assert three.shape == (3,)
    path = tmp_path / "traces.npz"
    save_traces(path, [r.id for r in records], traces)
    back = load_traces(path)
    np.testing.assert_array_equal(back["q1"].token_logits, traces[1].token_logits)
    np.testing.assert_array_equal(back["q0"].prompt_hidden, traces[0].prompt_hidden)


def test_knowledge_probe_recovers_a_planted_direction() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20))
    direction = np.zeros(20)
    direction[3] = 2.0
    y = (x @ direction + rng.normal(scale=0.5, size=400) > 0).astype(int)
    groups = np.arange(400) // 2  # pairs share a fold
    fit = fit_knowledge_probe(x, y, groups, c_grid=(0.01, 1.0))
    assert auroc(y, fit.oof_logits) > 0.9
    assert int(np.argmax(np.abs(fit.weights))) == 3
    assert auroc(y, fit.logits(x)) > 0.9


def test_traced_generation_matches_collection_and_teacher_forcing(tmp_path: Path) -> None:
    from guard.scoring import RiskScorer
    from probes.collect import collect_answers
    from probes.datasets import QAItem
    from probes.longform import LONG_RECIPE
    from probes.longform_collect import collect_traced

    loaded = tiny_loaded()
    probe = load_probe(write_probe(tmp_path / "probe", loaded))
    scorer = RiskScorer(probe)
    recipe = LONG_RECIPE.model_copy(update={"max_new_tokens": 12})
    questions = ["Where?", "Who wrote it, and when?", "Tell me about Velmora."]
    items = [QAItem(id=f"q{i}", question=q, answers=["Paris"]) for i, q in enumerate(questions)]
    traced = collect_traced(loaded, scorer, items, tmp_path, "set", recipe, batch_size=2)
    plain = collect_answers(loaded, items, tmp_path / "plain.jsonl", recipe, batch_size=2)
    assert [r.response_ids for r in traced] == [r.response_ids for r in plain]
    assert [r.stopped for r in traced] == [r.stopped for r in plain]
    kept = [r for r in traced if r.response_ids]
    forced = trace_answers(loaded, scorer, kept, batch_size=3)
    back = load_traces(tmp_path / "set.traces.npz")
    for record, reference in zip(kept, forced, strict=True):
        got = back[record.id]
        for name in ("token_logits", "logprobs", "entropies", "prompt_hidden"):
            np.testing.assert_allclose(getattr(got, name), getattr(reference, name), atol=1e-4)
    again = collect_traced(loaded, scorer, items, tmp_path, "set", recipe, batch_size=2)
    assert again == traced  # resumed: nothing asked twice, same records
