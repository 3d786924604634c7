"""The made-up entity generator: deterministic, collision-free, rendered short and long."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from probes.judge import normalize_answer
from probes.madeup import KINDS, Vocabulary, made_up_entities, qa_texts, render
from tests.conftest import NQ_OPEN, TRIVIAQA

QA_FILES = [Path(TRIVIAQA), Path(NQ_OPEN)]
HELDOUT = sorted((Path(__file__).parents[2] / "bench/data").glob("madeup_heldout*.jsonl"))
# Names two independent helpers both invented, found when set 9 was added (README):
# (name, the earlier set, the later set).
KNOWN_COLLISIONS = {
    ("valdoreña", "madeup_heldout", "madeup_heldout5"),
    ("a grammar of small rains", "madeup_heldout4", "madeup_heldout6"),
    ("tessaline pharmaceuticals", "madeup_heldout2", "madeup_heldout6"),
    ("velbrinite", "madeup_heldout5", "madeup_heldout8"),
}
LONG_CUES = re.compile(
    r"^(tell me|who (is|was)|write a short (biography|history)|describe|what is the history|"
    r"give me (an overview|a short summary)|summarise|what can you tell|what is .* known for|"
    r"in a few sentences|explain (what|how)|what (were|is|does|happened))",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.from_qa_files(QA_FILES)


def test_same_seed_same_entities_and_prompts(vocabulary: Vocabulary) -> None:
    first = render(made_up_entities(120, seed=7, vocabulary=vocabulary), seed=7)
    again = render(made_up_entities(120, seed=7, vocabulary=vocabulary), seed=7)
    assert first == again
    other = made_up_entities(120, seed=8, vocabulary=vocabulary)
    assert {e.name for e in other}.isdisjoint({p.entity.name for p in first})


def test_names_collide_with_nothing_in_the_questions_or_aliases(vocabulary: Vocabulary) -> None:
    entities = made_up_entities(400, seed=0, vocabulary=vocabulary)
    assert len({e.name.lower() for e in entities}) == len(entities)
    corpus = " | " + " | ".join(normalize_answer(t) for f in QA_FILES for t in qa_texts(f)) + " | "
    for entity in entities:
        assert entity.coined, entity
        for word in entity.coined:
            assert f" {normalize_answer(word)} " not in corpus, (entity.name, word)
        assert f" {normalize_answer(entity.bare_name)} " not in corpus, entity.name


def test_coined_words_avoid_the_vocabulary() -> None:
    small = Vocabulary.from_texts(["Paris is the capital of France"])
    assert not small.allows("paris") and not small.allows("The Capital")
    assert small.allows("Velmora")
    entities = made_up_entities(50, seed=1, vocabulary=small)
    assert all(small.allows(word) for e in entities for word in e.coined)


def test_every_entity_is_asked_short_and_long(vocabulary: Vocabulary) -> None:
    entities = made_up_entities(160, seed=2, vocabulary=vocabulary)
    assert {e.kind for e in entities} == set(KINDS)
    prompts = render(entities, seed=2)
    assert len(prompts) == 2 * len(entities)
    for entity in entities:
        short, long = (p for p in prompts if p.entity == entity)
        assert short.form == "short" and long.form == "long"
        assert short.prompt.endswith("?"), short.prompt
        assert LONG_CUES.match(long.prompt) and long.prompt[-1] in ".?", long.prompt
        for prompt in (short, long):
            assert entity.coined[0] in prompt.prompt, prompt.prompt  # as the name writes it
            assert "  " not in prompt.prompt and ".." not in prompt.prompt
    biographies = [p for p in prompts if p.form == "long" and p.entity.kind == "person"]
    assert len({p.template for p in biographies}) >= 4  # varied wording, not one template


def test_bad_arguments(vocabulary: Vocabulary) -> None:
    with pytest.raises(ValueError, match="n >= 0"):
        made_up_entities(-1, seed=0, vocabulary=vocabulary)
    assert made_up_entities(0, seed=0, vocabulary=vocabulary) == []


def test_held_out_sets_share_no_name_with_the_generator_or_each_other(
    vocabulary: Vocabulary,
) -> None:
    """A held-out set is written without the generator: none of its made-up names is one the
    generator gives for its fit or validation seeds, and a new set repeats no earlier set's
    name (the collisions already there are recorded, so a new one fails)."""
    assert len(HELDOUT) >= 9
    generated = {
        e.bare_name.lower() for seed in (0, 1) for e in made_up_entities(400, seed, vocabulary)
    }
    first_set: dict[str, str] = {}
    collisions = set()
    for path in HELDOUT:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for row in rows:
            if row["kind"] not in ("short", "long"):
                continue
            name = row["entity"].lower().removeprefix("the ")
            assert name not in generated, (path.name, name)
            if first_set.setdefault(name, path.stem) != path.stem:
                collisions.add((name, first_set[name], path.stem))
    assert collisions == KNOWN_COLLISIONS
