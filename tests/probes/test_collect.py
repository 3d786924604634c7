"""Answer collection on a tiny random chat model: records, judging, sampling, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import probes.collect as collect_module
from guard.model import LoadedModel, encode_chats, end_token_ids
from guard.probe import PromptRecipe
from probes.collect import AnswerRecord, CollectError, collect_answers, read_answers
from probes.datasets import QAItem, split_of
from probes.judge import judge
from tests.fixtures.models import tiny_loaded

RECIPE = PromptRecipe(max_new_tokens=6)
QUESTIONS = [
    "Where is Paris?",
    "Who wrote Hamlet?",
    "Which city is the capital of France, the country?",
    "Answer?",
    "Where did Anne Frank die, and when?",
    "Café?",
    "Who wrote it in 1600?",
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """The tiny model, its end-of-turn logit raised so that some answers stop early."""
    tiny = tiny_loaded(seed=3, tokenizer="bpe", sharpen=False)
    eos = int(tiny.tokenizer.eos_token_id)
    with torch.no_grad():
        head = tiny.model.get_output_embeddings().weight
        head[eos] = 0.05 * torch.randn(head.shape[1], generator=torch.Generator().manual_seed(2))
    return tiny


def make_items() -> list[QAItem]:
    # a random model's answers are unknown in advance: single letters make some correct
    return [
        QAItem(id=f"q{i}", question=q, answers=["Paris", "e", "i", "n", "o", "s", "t"])
        for i, q in enumerate(QUESTIONS)
    ]


def test_records_follow_the_contract(loaded: LoadedModel, tmp_path: Path) -> None:
    items = make_items()
    records = collect_answers(loaded, items, tmp_path / "a.jsonl", RECIPE, batch_size=3)
    assert [r.id for r in records] == [item.id for item in items]  # input order
    prompts, _, _ = encode_chats(loaded.tokenizer, [RECIPE.messages(q) for q in QUESTIONS])
    stops = end_token_ids(loaded.model, loaded.tokenizer)
    for record, item, prompt in zip(records, items, prompts, strict=True):
        assert record.question == item.question and record.answers == item.answers
        assert record.split == split_of(item.id)
        assert record.prompt_ids == prompt
        assert not stops & set(record.response_ids)
        assert len(record.response_ids) <= RECIPE.max_new_tokens
        if not record.stopped:
            assert len(record.response_ids) == RECIPE.max_new_tokens
        assert record.response == loaded.tokenizer.decode(
            record.response_ids, skip_special_tokens=True
        )
        verdict = judge(record.response, item.answers, item.question)
        assert (record.correct, record.alias) == (verdict.correct, verdict.alias)
        assert (record.span is not None) == record.correct
        assert record.samples == [] and record.consistent
    assert any(r.stopped for r in records) and not all(r.stopped for r in records)
    assert any(r.correct for r in records)


def test_greedy_answers_do_not_depend_on_batching(loaded: LoadedModel, tmp_path: Path) -> None:
    items = make_items()
    one = collect_answers(loaded, items, tmp_path / "one.jsonl", RECIPE, batch_size=1)
    many = collect_answers(loaded, items, tmp_path / "many.jsonl", RECIPE, batch_size=4)
    assert [r.response_ids for r in one] == [r.response_ids for r in many]


def test_resume_after_a_kill(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = make_items()
    reference = collect_answers(loaded, items, tmp_path / "ref.jsonl", RECIPE, batch_size=2)

    out = tmp_path / "answers.jsonl"
    real_record = collect_module._record
    calls = 0

    def dying_record(*args: object, **kwargs: object) -> AnswerRecord:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise KeyboardInterrupt  # killed in the middle of a batch
        return real_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(collect_module, "_record", dying_record)
    with pytest.raises(KeyboardInterrupt):
        collect_answers(loaded, items, out, RECIPE, batch_size=2)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    with out.open("a", encoding="utf-8") as handle:  # the line being written when killed
        handle.write('{"id": "q6", "question": "Who wr')
    monkeypatch.setattr(collect_module, "_record", real_record)

    resumed = collect_answers(loaded, items, out, RECIPE, batch_size=2)
    assert resumed == reference
    lines = out.read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(item.id for item in items)  # each once, nothing truncated
    # a finished file is not asked again: no generation at all
    monkeypatch.setattr(collect_module, "GuardedModel", None)
    assert collect_answers(loaded, items, out, RECIPE, batch_size=2) == reference


def test_subset_of_an_existing_file_is_reused(loaded: LoadedModel, tmp_path: Path) -> None:
    items = make_items()
    out = tmp_path / "a.jsonl"
    first = collect_answers(loaded, items[:4], out, RECIPE, batch_size=4)
    both = collect_answers(loaded, items[2:], out, RECIPE, batch_size=4)
    assert both[:2] == first[2:]
    assert len(read_answers(out)) == len(items)


def test_resume_refuses_another_setup(loaded: LoadedModel, tmp_path: Path) -> None:
    items = make_items()[:2]
    out = tmp_path / "a.jsonl"
    collect_answers(loaded, items, out, RECIPE, batch_size=2)
    with pytest.raises(CollectError, match="recipe"):
        collect_answers(loaded, items, out, PromptRecipe(max_new_tokens=3), batch_size=2)


def test_corrupt_middle_line_is_an_error(loaded: LoadedModel, tmp_path: Path) -> None:
    items = make_items()[:3]
    out = tmp_path / "a.jsonl"
    collect_answers(loaded, items, out, RECIPE, batch_size=3)
    lines = out.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join([lines[0], "garbage", lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(CollectError, match="line 2"):
        read_answers(out)


def test_samples_are_judged_and_seeded(loaded: LoadedModel, tmp_path: Path) -> None:
    items = make_items()
    a = collect_answers(loaded, items, tmp_path / "a.jsonl", RECIPE, batch_size=4, samples=3)
    b = collect_answers(loaded, items, tmp_path / "b.jsonl", RECIPE, batch_size=4, samples=3)
    c = collect_answers(
        loaded, items, tmp_path / "c.jsonl", RECIPE, batch_size=4, samples=3, seed=1
    )
    assert a == b
    assert [r.samples for r in a] != [r.samples for r in c]
    for record in a:
        assert len(record.samples) == 3
        for sample in record.samples:
            assert sample.correct == judge(sample.text, record.answers).correct
        agree = all(s.correct == record.correct for s in record.samples)
        assert record.consistent == agree
    greedy = collect_answers(loaded, items, tmp_path / "g.jsonl", RECIPE, batch_size=4)
    assert [r.response_ids for r in a] == [r.response_ids for r in greedy]
    texts = {s.text for r in a for s in r.samples}
    assert len(texts) > len(items)  # sampling, not greedy repeated


def test_bad_arguments(loaded: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        collect_answers(loaded, make_items(), tmp_path / "a.jsonl", RECIPE, batch_size=0)


def test_resumed_records_are_judged_again(loaded: LoadedModel, tmp_path: Path) -> None:
    """Labels follow the current judge, whatever judged the file when it was written."""
    items = make_items()[:3]
    out = tmp_path / "a.jsonl"
    first = collect_answers(loaded, items, out, RECIPE, batch_size=3)
    stale = [r.model_copy(update={"correct": not r.correct, "span": None}) for r in first]
    out.write_text("".join(r.model_dump_json() + "\n" for r in stale), encoding="utf-8")
    again = collect_answers(loaded, items, out, RECIPE, batch_size=3)
    assert again == first
