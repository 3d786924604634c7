"""Made-up entities: names that exist nowhere, asked about as short questions and long requests.

Labels without a judge model: an entity that does not exist has no true facts, so any
substantive answer about it is a hallucination by construction (a refusal is the right
answer: `probes.judge.is_refusal`). Every name carries at least one *coined* word (built
from syllables, seeded) that occurs in none of the words of the forbidden texts (the
shared TriviaQA / NQ-open questions and aliases), so no name can collide with an entity
those sets ask about. Kinds: people, places, works, organisations, events, substances,
species, products, diseases and inventions, each with its own name patterns, short
factual questions ("What is the capital of the Republic of Tarvenia?") and long-form
requests ("Write a short biography of ...", "Tell me about ...", "What is the history of
..."). Compound names ("Kelbury") look real on purpose and may name a real village
somewhere; none occurs in the shared questions, and the model does not know them.

    vocabulary = Vocabulary.from_qa_files([TRIVIAQA, NQ_OPEN])
    entities = made_up_entities(300, seed=0, vocabulary=vocabulary)
    prompts = render(entities, seed=0)   # one short and one long prompt per entity
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from probes.judge import normalize_answer
from probes.madeup_templates import fill, templates

Kind = Literal[
    "person", "place", "work", "organisation", "event", "substance", "species", "product",
    "disease", "invention",
]  # fmt: skip
KINDS: tuple[Kind, ...] = (
    "person", "place", "work", "organisation", "event", "substance", "species", "product",
    "disease", "invention",
)  # fmt: skip
Form = Literal["short", "long"]

_ONSETS = (
    "b", "br", "c", "cr", "d", "dr", "f", "fl", "g", "gl", "gr", "h", "j", "k", "kl", "l",
    "m", "n", "p", "pl", "pr", "qu", "r", "s", "sh", "sk", "sl", "st", "t", "th", "tr", "v",
    "w", "z", "ch", "", "",
)  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou", "ia", "y", "au")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x", "v", "st", "ld", "rn")
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "surname": ("", "", "son", "ley", "wick", "ford", "ski", "ova", "ez", "etti", "berg",
                "mann", "ard", "ton", "hurst", "ine", "ow"),
    "place": ("ia", "ovia", "mere", "vale", "holm", "grad", "ora", "burg", "port", "wick",
              "ton", "istan", "ara", "eth", ""),
    "genus": ("us", "ia", "ops", "odon", "ella", "ites", "ium"),
    "epithet": ("ensis", "ii", "ata", "oides", "ica", "ifera", "osa"),
    "substance": ("ium", "ine", "ite", "ol", "ase", "azole", "amide", "orin", "ex"),
    "brand": ("ix", "tron", "ora", "ex", "ify", "o", "io", "a", "us"),
    "plain": ("", "", "a", "o", "is", "en"),
}  # fmt: skip
# Realistic compounds of English name parts ("Kelbury", "Wexdale"): made-up names need not
# look strange, and a probe must not learn that they do.
_NAME_HEADS = (
    "Ash", "Thorn", "Whit", "Hal", "Brad", "Wex", "Pen", "Cal", "Mar", "Dun", "Fair", "Hart",
    "Kel", "Lind", "Mor", "Ral", "Stan", "Wes", "Alder", "Bram", "Cor", "Elm", "Gar", "Holl",
    "Nor", "Quen", "Sel", "Tarv", "Vel", "Wyn",
)  # fmt: skip
_NAME_TAILS = (
    "combe", "bury", "wick", "ford", "ley", "ton", "more", "dale", "field", "worth", "by",
    "stead", "ham", "ridge", "well", "brook", "wood", "gate", "shaw", "holt", "ania", "ovia",
)  # fmt: skip
_FIRST_NAMES = (
    "Marcus", "Elena", "Tobias", "Ingrid", "Rafael", "Amara", "Henrik", "Lucia", "Dmitri",
    "Yuki", "Oliver", "Fatima", "Gregor", "Celeste", "Arjun", "Margot", "Silas", "Nadia",
    "Emil", "Rosalind", "Kenji", "Beatrix", "Tomas", "Leila", "Anton", "Clara", "Idris",
    "Vera", "Julian", "Mireille", "Oskar", "Priya", "Matthias", "Sofia", "Lionel", "Agnes",
    "Hugo", "Ottilie", "Felix", "Imogen", "Bruno", "Helena", "Caspar", "Noor", "Edmund",
    "Greta", "Stellan", "Wanda", "Pavel", "Harriet",
)  # fmt: skip
_ROLES = (
    "novelist", "painter", "physicist", "composer", "footballer", "politician", "chemist",
    "poet", "architect", "philosopher", "actress", "explorer", "general", "sculptor",
    "economist", "astronomer", "jazz pianist", "botanist", "film director", "tennis player",
    "mathematician", "singer", "inventor", "historian",
)  # fmt: skip
_ADJECTIVES = (
    "Silent", "Crimson", "Hollow", "Glass", "Last", "Winter", "Broken", "Golden", "Quiet",
    "Distant", "Burning", "Salt", "Iron", "Paper", "Seventh", "Hidden",
)  # fmt: skip
_NOUNS = (
    "Orchard", "Harbour", "Mirror", "Lantern", "Garden", "Tide", "Crown", "Bridge", "Letter",
    "Tower", "River", "Clock", "Feather", "Meadow", "Archive", "Voyage",
)  # fmt: skip
_FIELDS = ("Marine Biology", "Applied Optics", "Linguistics", "Economics", "Agronomy")
_ANIMALS = ("tree frog", "beetle", "orchid", "warbler", "catfish", "lizard", "moth", "fern")


@dataclass(frozen=True)
class MadeUpEntity:
    """One entity that does not exist: ``name`` as it is written in a sentence (with its
    article: "the Treaty of Velmora"), ``descriptor`` what it would be ("novel"), the coined
    words that make the name unique, and ``creator`` for works and products."""

    id: str
    kind: Kind
    name: str
    descriptor: str
    coined: tuple[str, ...]
    creator: str | None = None

    @property
    def bare_name(self) -> str:
        """The name without a leading article ("Treaty of Velmora")."""
        return self.name[4:] if self.name.startswith("the ") else self.name


@dataclass(frozen=True)
class MadeUpPrompt:
    """One request about a made-up entity: a short factual question or a long-form request."""

    id: str
    entity: MadeUpEntity
    form: Form
    template: str
    prompt: str

    def as_json(self) -> dict[str, str]:
        return {
            "id": self.id,
            "kind": self.entity.kind,
            "form": self.form,
            "name": self.entity.name,
            "template": self.template,
            "prompt": self.prompt,
        }


class Vocabulary:
    """The normalised words of texts a coined word must not be (questions and aliases)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = frozenset(words)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocabulary:
        return cls(word for text in texts for word in normalize_answer(text).split())

    @classmethod
    def from_qa_files(cls, paths: Sequence[Path]) -> Vocabulary:
        """Words of every ``question`` and ``answers`` entry of JSONL QA files."""
        return cls.from_texts(text for path in paths for text in qa_texts(Path(path)))

    def allows(self, word: str) -> bool:
        norm = normalize_answer(word).split()
        return bool(norm) and not any(part in self.words for part in norm)


def qa_texts(path: Path) -> Iterable[str]:
    """The question and every alias of each line of a JSONL QA file."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                yield str(row["question"])
                yield from (str(alias) for alias in row["answers"])


class _Coiner:
    """Coins pronounceable words (2-3 syllables and a kind's suffix) the vocabulary allows,
    never the same word twice."""

    def __init__(self, rng: random.Random, vocabulary: Vocabulary) -> None:
        self._rng = rng
        self._vocabulary = vocabulary
        self._used: set[str] = set()

    def __call__(self, style: str) -> str:
        """A new word: ``style`` a suffix family of `_SUFFIXES`, or "compound"."""
        rng = self._rng
        for _ in range(1000):
            if style == "compound":
                word = rng.choice(_NAME_HEADS) + rng.choice(_NAME_TAILS)
            else:
                syllables = rng.choice((1, 2, 2, 2, 3))
                stem = "".join(
                    rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                    for _ in range(syllables)
                )
                word = (stem + rng.choice(_SUFFIXES[style])).capitalize()
            key = word.lower()
            if 4 <= len(word) <= 10 and key not in self._used and self._vocabulary.allows(word):
                self._used.add(key)
                return word
        raise RuntimeError(f"could not coin a new '{style}' word: the vocabulary allows too few")


_Namer = Callable[[random.Random, _Coiner], tuple[str, str, tuple[str, ...], str | None]]


def _person(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    surname = coin(rng.choice(("surname", "compound")))
    first = rng.choice(_FIRST_NAMES)
    middle = f" {rng.choice('ABCDEFGHJKLMNPRSTW')}." if rng.random() < 0.15 else ""
    return f"{first}{middle} {surname}", rng.choice(_ROLES), (surname,), None


def _place(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin(rng.choice(("place", "place", "compound")))
    pattern, descriptor = rng.choice(
        (
            ("the Republic of {}", "country"), ("{}", "town"), ("{}", "city"),
            ("Lake {}", "lake"), ("Mount {}", "mountain"), ("the {} Islands", "archipelago"),
            ("the {} Valley", "region"), ("the River {}", "river"), ("{} Province", "province"),
            ("the Kingdom of {}", "kingdom"),
        )
    )  # fmt: skip
    return pattern.format(word), descriptor, (word,), None


def _work(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin("plain")
    creator, _, coined, _ = _person(rng, coin)
    adjective, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
    title = rng.choice(
        (
            f"The {adjective} {noun} of {word}", f"{word}", f"The {noun}s of {word}",
            f"{word} and the {adjective} {noun}", f"Songs for {word}",
        )
    )  # fmt: skip
    descriptor = rng.choice(
        ("novel", "film", "opera", "painting", "symphony", "album", "play", "poem")
    )
    return title, descriptor, (word, *coined), creator


def _organisation(
    rng: random.Random, coin: _Coiner
) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin(rng.choice(("brand", "place", "plain", "compound")))
    pattern, descriptor = rng.choice(
        (
            ("the {} Institute", "research institute"), ("{} Dynamics", "company"),
            ("{} Holdings", "company"), ("the {} Party", "political party"),
            ("{} United F.C.", "football club"), ("the {} Foundation", "charity"),
            ("{} Airways", "airline"), ("the University of {}", "university"),
            ("the {} Institute of " + rng.choice(_FIELDS), "research institute"),
            ("the {} Quartet", "string quartet"),
        )
    )  # fmt: skip
    return pattern.format(word), descriptor, (word,), None


def _event(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin(rng.choice(("place", "plain")))
    pattern, descriptor = rng.choice(
        (
            ("the Battle of {}", "battle"), ("the Treaty of {}", "treaty"),
            ("the {} Accord", "agreement"), ("the {} Uprising", "uprising"),
            ("the {} Festival", "festival"), ("the {} Expedition", "expedition"),
            ("the Siege of {}", "siege"), ("the {} Crisis", "political crisis"),
            ("the {} Earthquake", "earthquake"), ("the {} Cup", "sporting tournament"),
        )
    )  # fmt: skip
    year = f" of {rng.randint(1520, 1990)}" if rng.random() < 0.3 else ""
    return pattern.format(word) + year, descriptor, (word,), None


def _substance(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin("substance")
    pattern, descriptor = rng.choice(
        (
            ("{}", "chemical element"), ("{} chloride", "compound"), ("{}", "mineral"),
            ("{}", "drug"), ("{} acid", "acid"), ("{} steel", "alloy"), ("{}", "pesticide"),
        )
    )  # fmt: skip
    word = word if descriptor == "mineral" else word.lower()
    return pattern.format(word), descriptor, (word,), None


def _species(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    if rng.random() < 0.5:
        genus, epithet = coin("genus"), coin("epithet").lower()
        return f"{genus} {epithet}", "species", (genus, epithet), None
    word = coin("place")
    animal = rng.choice(_ANIMALS)
    return f"the {word} {animal}", f"species of {animal}", (word,), None


def _product(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    brand = coin("brand")
    model = rng.choice(("Pro", "X", "Nova", "Max", "Air", "One", "S")) + f" {rng.randint(2, 9)}"
    descriptor = rng.choice(
        ("smartphone", "car", "camera", "programming language", "board game", "video game",
         "operating system", "synthesiser")
    )  # fmt: skip
    name = f"the {brand} {model}" if descriptor != "programming language" else brand
    return name, descriptor, (brand,), f"{coin('brand')} Corporation"


def _disease(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin(rng.choice(("compound", "surname", "place")))
    pattern = rng.choice(
        ("{}'s disease", "{} syndrome", "{} fever", "{} palsy", "the {} virus", "{}itis")
    )
    name = pattern.format(word.lower() if pattern == "{}itis" else word)
    coined = (name.split()[0] if pattern == "{}itis" else word,)
    return name, "disease", coined, None


def _invention(rng: random.Random, coin: _Coiner) -> tuple[str, str, tuple[str, ...], str | None]:
    word = coin(rng.choice(("compound", "surname", "brand")))
    thing, descriptor = rng.choice(
        (
            ("engine", "engine"), ("loom", "loom"), ("telescope", "telescope"),
            ("process", "industrial process"), ("valve", "valve"), ("cipher", "cipher"),
            ("lamp", "lamp"), ("calculating machine", "calculating machine"),
        )
    )  # fmt: skip
    creator, _, coined, _ = _person(rng, coin)
    return f"the {word} {thing}", descriptor, (word, *coined), creator


_NAMERS: dict[Kind, _Namer] = {
    "person": _person, "place": _place, "work": _work, "organisation": _organisation,
    "event": _event, "substance": _substance, "species": _species, "product": _product,
    "disease": _disease, "invention": _invention,
}  # fmt: skip


def made_up_entities(
    n: int, seed: int, vocabulary: Vocabulary, kinds: Sequence[Kind] = KINDS
) -> list[MadeUpEntity]:
    """``n`` entities, kinds in turn, the same for the same seed and vocabulary."""
    if n < 0 or not kinds:
        raise ValueError("need n >= 0 and at least one kind")
    rng = random.Random(f"madeup-{seed}")
    coin = _Coiner(rng, vocabulary)
    entities = []
    for index in range(n):
        kind = kinds[index % len(kinds)]
        name, descriptor, coined, creator = _NAMERS[kind](rng, coin)
        entities.append(
            MadeUpEntity(f"madeup-{seed}-{index}", kind, name, descriptor, coined, creator)
        )
    return entities


def _entity_digest(entity: MadeUpEntity, salt: str) -> random.Random:
    return random.Random(hashlib.sha256(f"{salt}|{entity.id}|{entity.name}".encode()).digest())


def render(
    entities: Sequence[MadeUpEntity], seed: int = 0, forms: Sequence[Form] = ("short", "long")
) -> list[MadeUpPrompt]:
    """One prompt per entity and form, templates drawn per entity (deterministic)."""
    prompts = []
    for entity in entities:
        for form in forms:
            rng = _entity_digest(entity, f"{seed}-{form}")
            key, template = rng.choice(templates(entity, long=form == "long"))
            prompts.append(
                MadeUpPrompt(f"{entity.id}-{form}", entity, form, key, fill(template, entity))
            )
    return prompts
