"""Rule-based correctness of a free-text answer, and where the answer sits in it.

TriviaQA's normalisation (lower-case, punctuation to spaces, articles a/an/the removed,
whitespace collapsed) applied to both the response and each gold alias; an answer is
correct when a normalised alias occurs in the normalised response *on word boundaries*
("us" does not match inside "russia"). Unicode: compatibility forms are folded (NFKD),
accents dropped ("Pelé" matches "Pele"), every Unicode punctuation or symbol counts as
punctuation, and a comma between digits is a thousands separator ("1,000" = "1000").

Normalisation keeps, for every normalised word, where it came from in the raw text, so
the judge can say which raw characters (and, with the tokenizer, which response tokens)
hold the matched answer.

A *refusal* ("I don't know", "I'm not sure who that is", "There is no country called
...") answers nothing, so it is never a hallucination: for a made-up entity it is the
right answer. `is_refusal` reads the answer's first sentence (where a model commits to
answering or not); a refusal that goes on to answer anyway in that sentence ("I'm not
sure, but I think it is Lyon") is not one. ``Judgement.hallucinated`` is the label.

    j = judge("It is the Eiffel Tower.", ["Eiffel Tower"])
    j.correct, j.alias, j.char_span  # True, "eiffel tower", (10, 22)
    judge("I'm not sure who that is.", ["Paris"]).hallucinated  # False
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guard.spans import token_char_spans

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class Judgement:
    """Verdict on one response: the matched normalised alias and its raw character span."""

    correct: bool
    alias: str | None = None
    char_span: tuple[int, int] | None = None  # [start, end) in the raw response text
    refusal: bool = False

    @property
    def hallucinated(self) -> bool:
        """The label: neither a correct answer nor a refusal."""
        return not self.correct and not self.refusal


_REFUSAL_PATTERNS = (
    r"\bi (do not|don't|dont) (know|recognise|recognize)\b",
    r"\bi (do not|don't|dont) have (any |enough |specific |reliable )?"
    r"(information|details|data|knowledge|records?)\b",
    r"\bi have no (information|knowledge|idea|record|records|data|details)\b",
    r"\bi('m| am) (not sure|not certain|not aware|unaware|not familiar|unable to|afraid)\b"
    r"(?! (i'd|i would) (say|call)\b)",
    r"\bi (could not|couldn't|can't|cannot|can not|was unable to|am unable to) "
    r"(find|locate|provide|answer|identify|verify|confirm|tell|say)\b",
    r"\bnot familiar with\b",
    r"\bno (reliable |specific |available |public )?(information|record|records|data|mention)"
    r" (is |are |was )?(available|exists?|about|on|of|for|found)\b",
    r"\b(there is|there's|there are|there was|there were) no (such|known|record|records|"
    r"information|data|evidence|mention|widely|real|official|notable|historical|specific|"
    r"publicly|reliable|existing)\b",
    r"\b(there is|there's|there are|there was) no [a-z' -]{1,40} (called|named|known as)\b",
    r"\b(does not|doesn't|did not|didn't|do not|don't) (seem to |appear to )?exist\b",
    r"\b(is|are|was) not (a real|an actual|a known|a recognised|a recognized|real)\b",
    r"\b(is|are|remains?) unknown\b",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _REFUSAL_PATTERNS), re.IGNORECASE)
# A refusal that answers anyway in the same sentence ("I'm not sure, but it is Lyon").
_ANSWERS_ANYWAY = re.compile(
    r"\b(but|however|although)\b,?(?! (i (can|could|would|will|'d|'ll|am happy|'m happy)|you|"
    r"if you|feel free|there is no|there's no|it is not|it's not|it does not)\b)"
)
_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s|\n")


def is_refusal(response: str) -> bool:
    """Does the answer decline to answer (see module docstring)? Reads its first sentence."""
    text = response.strip().replace("\u2019", "'")
    first = _FIRST_SENTENCE.split(text, maxsplit=1)[0]
    for found in _REFUSAL.finditer(first):
        if _title_cased(found.group()):  # "I Don't Know How to Love Him" is a song
            continue
        return _ANSWERS_ANYWAY.search(first.lower(), found.end()) is None
    return False


def _title_cased(text: str) -> bool:
    words = [w for w in text.split() if w[:1].isalpha()]
    return len(words) >= 3 and all(w[0].isupper() for w in words)


@dataclass(frozen=True)
class _Word:
    text: str
    start: int  # raw index of the word's first character
    end: int  # raw index just past its last character


def _fold(ch: str) -> str:
    """One raw character as normalised characters: lower-cased, unaccented, punctuation -> ' '."""
    out = []
    for part in unicodedata.normalize("NFKD", ch.lower()):
        category = unicodedata.category(part)
        if category in ("Mn", "Cf"):  # combining accents, zero-width and format marks
            continue
        out.append(" " if category[0] in "PSZC" else part)
    return "".join(out)


def _is_thousands_comma(text: str, index: int) -> bool:
    return (
        text[index] == ","
        and 0 < index < len(text) - 1
        and text[index - 1].isdigit()
        and text[index + 1].isdigit()
    )


def _words(text: str) -> list[_Word]:
    """Normalised words of ``text`` (articles dropped) with their raw character spans."""
    words: list[_Word] = []
    chars: list[str] = []
    start = last = 0
    for index, ch in enumerate(text):
        for part in "" if _is_thousands_comma(text, index) else _fold(ch):
            if part != " ":
                if not chars:
                    start = index
                chars.append(part)
                last = index
            elif chars:
                words.append(_Word("".join(chars), start, last + 1))
                chars = []
    if chars:
        words.append(_Word("".join(chars), start, last + 1))
    return [word for word in words if word.text not in ARTICLES]


def normalize_answer(text: str) -> str:
    """TriviaQA normalisation (see module docstring): ``"The U.S.A.!"`` -> ``"u s"``."""
    return " ".join(word.text for word in _words(text))


def judge(response: str, aliases: list[str], question: str | None = None) -> Judgement:
    """Is a gold alias in the response (normalised, on word boundaries)? Longest alias wins.

    Aliases that normalise to nothing are ignored; no usable alias or an empty response
    is incorrect. Among equally long aliases the earliest match in the response wins.
    With ``question``, aliases that occur in the question are ignored too: repeating the
    question ("The Georgia Peach was ...") is not answering it. TriviaQA's alias lists
    hold many such entries (on 1,707 SmolLM2 answers, 84 of 278 "correct" verdicts
    were only that), and they would label hallucinations as faithful. ``refusal`` is
    `is_refusal` of the response (a correct answer wins over it).
    """
    words = _words(response)
    texts = [word.text for word in words]
    asked = _words(question) if question else []
    asked_texts = [word.text for word in asked]
    best: tuple[int, int, int, str] | None = None  # (-length, position, n_words, alias)
    for alias in {normalize_answer(a) for a in aliases}:
        needle = alias.split()
        if not needle or (asked_texts and _find(asked_texts, needle) is not None):
            continue
        position = _find(texts, needle)
        if position is None:
            continue
        candidate = (-len(alias), position, len(needle), alias)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        return Judgement(correct=False, refusal=is_refusal(response))
    _, position, size, alias = best
    span = (words[position].start, words[position + size - 1].end)
    return Judgement(True, alias, span, refusal=is_refusal(response))


def _find(haystack: list[str], needle: list[str]) -> int | None:
    """First index where ``needle`` occurs in ``haystack`` as a whole-word run."""
    size = len(needle)
    for index in range(len(haystack) - size + 1):
        if haystack[index : index + size] == needle:
            return index
    return None


def answer_token_span(
    tokenizer: PreTrainedTokenizerBase, response_ids: list[int], char_span: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Half-open range of the response tokens overlapping ``char_span`` (None if none)."""
    if char_span is None:
        return None
    start, end = char_span
    hits = [
        index
        for index, (s, e) in enumerate(token_char_spans(tokenizer, response_ids))
        if s < end and e > start
    ]
    return (hits[0], hits[-1] + 1) if hits else None
