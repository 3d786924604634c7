"""The judge: TriviaQA normalisation, word-boundary alias matching, raw and token spans."""

from __future__ import annotations

import pytest

from probes.judge import (
    Judgement,
    answer_token_span,
    is_refusal,
    judge,
    normalize_answer,
    token_char_spans,
)
from tests.fixtures.models import bpe_tokenizer


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A   tale of   an apple  ", "tale of apple"),
        ("Theatre, then a thesis", "theatre then thesis"),  # articles only as whole words
        ("U.S.A.!", "u s"),  # punctuation becomes spaces, then 'a' is an article
        ("Bergen-Belsen", "bergen belsen"),
        ("O’Brien's", "o brien s"),
        ("Pelé, Zürich, naïve", "pele zurich naive"),
        ("ﬁne Ⅻ", "fine xii"),  # compatibility forms fold
        ("1,000,000 people", "1000000 people"),  # thousands separators between digits
        ("3.14", "3 14"),
        ("50%", "50"),
        ("ÉCOLE", "ecole"),
        ("snake_case", "snake case"),
        ("zero\u200bwidth", "zerowidth"),
        ("", ""),
        ("the a an", ""),
        ("?!...", ""),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_correct_answer_reports_alias_and_raw_span() -> None:
    response = "I think it is the Eiffel Tower, in Paris."
    verdict = judge(response, ["Eiffel tower"])
    assert verdict == Judgement(True, "eiffel tower", (18, 30))
    assert response[18:30] == "Eiffel Tower"


def test_word_boundaries() -> None:
    assert not judge("Russia", ["US", "U.S."]).correct
    assert not judge("Parisian food", ["Paris"]).correct
    assert judge("It's the U.S.", ["U.S."]) == Judgement(True, "u s", (9, 12))
    assert not judge("1945", ["19"]).correct


def test_numbers() -> None:
    assert judge("About 1,000 years", ["1000"]).correct
    assert judge("In 1066.", ["1066"]) == Judgement(True, "1066", (3, 7))
    assert not judge("1067", ["1066"]).correct


def test_unicode_and_accents_match_both_ways() -> None:
    verdict = judge("It was Pelé.", ["Pele"])
    assert verdict == Judgement(True, "pele", (7, 11))
    assert judge("Zurich", ["Zürich"]).correct
    assert judge("ＰＡＲＩＳ", ["paris"]).correct  # full-width letters


def test_longest_alias_wins_and_span_covers_it() -> None:
    response = "The Bergen-Belsen concentration camp."
    verdict = judge(response, ["Belsen", "bergen belsen concentration camp", "Bergen-Belsen"])
    assert verdict.alias == "bergen belsen concentration camp"
    assert verdict.char_span is not None
    assert response[slice(*verdict.char_span)] == "Bergen-Belsen concentration camp"


def test_articles_and_punctuation_in_aliases() -> None:
    assert judge("beatles", ["The Beatles"]).correct
    assert judge("The Beatles!", ["beatles"]) == Judgement(True, "beatles", (4, 11))


def test_empty_response_and_empty_aliases_are_incorrect() -> None:
    assert judge("", ["Paris"]) == Judgement(False)
    assert judge("   ", ["Paris"]) == Judgement(False)
    assert judge("Paris", []) == Judgement(False)
    # aliases that normalise to nothing are dropped, not matched everywhere
    assert judge("Paris", ["", "the", "...", " "]) == Judgement(False)
    assert judge("Paris", ["", "Paris"]).correct


def test_token_char_spans_tile_the_decoded_text() -> None:
    tokenizer = bpe_tokenizer()
    text = "Café in Zürich, 1,000 km: ☃ naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spans = token_char_spans(tokenizer, ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert len(spans) == len(ids)
    assert spans[0][0] == 0 and spans[-1][1] == len(decoded)
    # contiguous; a token ending inside a multi-byte character shares the next one's span
    assert all(a[1] == b[0] or a == b for a, b in zip(spans, spans[1:], strict=False))
    assert any(a == b for a, b in zip(spans, spans[1:], strict=False))  # "☃" is 3 bytes


def test_answer_token_span_covers_the_matched_text() -> None:
    tokenizer = bpe_tokenizer()
    response = "I think Zürich, Switzerland."
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    verdict = judge(response, ["Zurich"])
    span = answer_token_span(tokenizer, ids, verdict.char_span)
    assert span is not None
    start, end = span
    covered = tokenizer.decode(ids[start:end])
    assert "Zürich" in covered
    # minimal: dropping the first or last token loses part of the answer
    assert "Zürich" not in tokenizer.decode(ids[start + 1 : end])
    assert "Zürich" not in tokenizer.decode(ids[start : end - 1])


def test_answer_token_span_none_without_match() -> None:
    tokenizer = bpe_tokenizer()
    ids = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert answer_token_span(tokenizer, ids, None) is None
    assert answer_token_span(tokenizer, [], (0, 3)) is None


def test_aliases_that_only_repeat_the_question_do_not_count() -> None:
    aliases = ["Ty Cobb", "Georgia Peach", "Cobb"]
    question = "Who was the Georgia Peach?"
    assert judge("The Georgia Peach was an American artist.", aliases).correct  # plain rule
    assert not judge("The Georgia Peach was an American artist.", aliases, question).correct
    verdict = judge("The Georgia Peach was Ty Cobb.", aliases, question)
    assert verdict.correct and verdict.alias == "ty cobb"
    # Words of the alias elsewhere in the question do not drop it: only the whole alias.
    assert judge("It is Baghdad.", ["Baghdad"], "What is the capital of Iraq?").correct


@pytest.mark.parametrize(
    "response",
    [
        "I don't know.",
        "I’m not sure who that is.",
        "I'm not aware of any country called the Republic of Tarvania.",
        "I couldn't find any information about Blake Bourne.",
        "I could not find any records of that novel.",
        "There is no country called Tarvania. Perhaps you mean Tanzania?",
        "There is no such element.",
        "There's no record of a battle by that name.",
        "The Treaty of Velmora does not exist.",
        "Sorry, I don't have any information on that person.",
        "I have no information about Marcus Quenlow.",
        "I am not familiar with the Quenlor tree frog. Could you give me more context?",
        "Velorium is not a real chemical element.",
        "No information is available about this company.",
        "The author of that poem is unknown.",
        "I cannot provide details about that film, but I can help with something else.",
    ],
)
def test_refusals_are_recognised_and_never_hallucinated(response: str) -> None:
    verdict = judge(response, ["Nova Haven"], "What is the capital of Tarvania?")
    assert is_refusal(response)
    assert verdict.refusal and not verdict.correct and not verdict.hallucinated


@pytest.mark.parametrize(
    "response",
    [
        "The capital of Tarvania is Nova Haven.",
        "Blake Bourne is a British actor. He was not sure of his career at first.",
        "There is no doubt that Marcus Quenlow was the greatest painter of his age.",
        "I'm not sure, but I think it is Lyon.",
        "Marcus Quenlow (1902-1977) was a physicist. He did not know his father.",
        "The Velmora Accord was signed in 1848. Its author is unknown.",  # refusal too late
        "I Don't Know How To Love Him is a 1990s American sitcom.",  # a title
        "I'm not sure I'd say that, Bob Dylan. He's a great artist.",
        "",
    ],
)
def test_answers_are_not_refusals(response: str) -> None:
    assert not is_refusal(response)
    assert judge(response, ["Paris"]).hallucinated


def test_a_correct_answer_with_a_hedge_is_correct() -> None:
    verdict = judge("I don't know for certain, but I believe it is Paris.", ["Paris"])
    assert verdict.correct and not verdict.hallucinated
