"""The wording of requests about made-up entities (`probes.madeup`): templates per kind.

Short templates ask for one fact (a name, a year, a place: what a short answer holds);
long templates ask for an account (who is / tell me about / biography / describe /
history of / summary of ...). Placeholders: ``{name}`` (with its article, inside a
sentence), ``{Name}`` (capitalised, to open a sentence), ``{descriptor}`` ("novel"),
``{creator}``. A template may be limited to some descriptors (a capital only for
countries, provinces and kingdoms).
"""

from __future__ import annotations

from typing import Protocol


class MadeUpEntity(Protocol):
    """What a template reads of an entity (`probes.madeup.MadeUpEntity` is one)."""

    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def bare_name(self) -> str: ...
    @property
    def descriptor(self) -> str: ...
    @property
    def coined(self) -> tuple[str, ...]: ...
    @property
    def creator(self) -> str | None: ...


# (key, template, descriptors it fits or None for all)
Template = tuple[str, str, tuple[str, ...] | None]

_STATES = ("country", "kingdom", "province", "region")
_SETTLEMENTS = ("town", "city")
_PEOPLE_SKIP = frozenset({"history", "explain_what"})  # "Explain what Ada Lovelace is"

_SHORT: dict[str, list[Template]] = {
    "person": [
        ("born_year", "In which year was {described} born?", None),
        ("nationality", "What nationality was {described}?", None),
        ("birthplace", "In which city was {name} born?", None),
        ("spouse", "Who was {name} married to?", None),
        ("university", "Which university did {described} attend?", None),
        ("died_country", "In which country did {name} die?", None),
        ("first_work", "What was the title of {name}'s first major work?", None),
    ],
    "place": [
        ("capital", "What is the capital of {name}?", _STATES),
        ("language", "What is the official language of {name}?", (*_STATES, *_SETTLEMENTS)),
        ("population", "What is the population of {name}?", (*_STATES, *_SETTLEMENTS)),
        ("country_of", "In which country is {described}?", None),
        ("height", "How high is {name}?", ("mountain",)),
        ("flows_into", "Into which sea does {name} flow?", ("river",)),
        ("founded", "In which year was {name} founded?", _SETTLEMENTS),
        ("largest_city", "What is the largest city of {name}?", _STATES),
    ],
    "work": [
        ("author", "Who created {described}?", None),
        ("wrote", "Who wrote the {descriptor} '{name}'?", ("novel", "play", "poem", "opera")),
        ("directed", "Who directed the film '{name}'?", ("film",)),
        ("year", "In which year was the {descriptor} '{name}' released?", ("film", "album")),
        ("year_written", "In which year was '{name}' written?", ("novel", "play", "poem", "opera")),
        ("painted", "Who painted '{name}'?", ("painting",)),
        ("protagonist", "What is the name of the main character in '{name}'?", None),
    ],
    "organisation": [
        ("founder", "Who founded {name}?", None),
        ("hq", "In which city is {name} based?", None),
        ("founded", "In which year was {name} founded?", None),
        ("leader", "Who is the current head of {name}?", None),
    ],
    "event": [
        ("year", "In which year did {name} take place?", None),
        ("where", "Where did {name} take place?", None),
        ("winner", "Who won {name}?", ("battle", "sporting tournament", "siege")),
        ("signed", "Which countries signed {name}?", ("treaty", "agreement")),
        ("leader", "Who led {name}?", ("uprising", "expedition")),
    ],
    "substance": [
        ("discoverer", "Who discovered {name}?", None),
        ("formula", "What is the chemical formula of {name}?", None),
        ("symbol", "What is the chemical symbol of {name}?", ("chemical element",)),
        ("use", "What is {name} mainly used to treat?", ("drug",)),
        ("colour", "What colour is {described}?", None),
    ],
    "species": [
        ("habitat", "On which continent is {name} found?", None),
        ("diet", "What does {name} eat?", None),
        ("described_by", "Who first described {described}?", None),
    ],
    "disease": [
        ("cause", "What causes {name}?", None),
        ("discoverer", "Who first described {name}?", None),
        ("symptom", "What is the main symptom of {name}?", None),
        ("treatment", "Which drug is used to treat {name}?", None),
    ],
    "invention": [
        ("inventor", "Who invented {name}?", None),
        ("year", "In which year was {name} invented?", None),
        ("where", "In which country was {name} first built?", None),
    ],
    "product": [
        ("maker", "Which company makes {name}?", None),
        ("release", "In which year was {name} released?", None),
        ("designer", "Who designed {name}?", None),
    ],
}

_LONG_COMMON: list[Template] = [
    ("tell_me", "Tell me about {name}.", None),
    ("what_know", "What can you tell me about {name}?", None),
    ("describe", "Describe {name}.", None),
    ("overview", "Give me an overview of {name}.", None),
    ("history", "What is the history of {name}?", None),
    ("summary", "Give me a short summary of {name}.", None),
    ("known_for", "What is {name} known for?", None),
    ("few_sentences", "In a few sentences, tell me about {described}.", None),
    ("explain_what", "Explain what {name} is.", None),
]

_LONG: dict[str, list[Template]] = {
    "person": [
        ("who_is", "Who is {name}?", None),
        ("who_was", "Who was {described}?", None),
        ("biography", "Write a short biography of {name}.", None),
        ("career", "Describe the career of {described}.", None),
        ("life", "Tell me about the life and work of {name}.", None),
        ("achievements", "What were the main achievements of {name}?", None),
    ],
    "work": [
        ("plot", "Summarise the plot of '{name}'.", ("novel", "film", "opera", "play")),
        ("about_work", "What is the {descriptor} '{name}' about?", None),
        ("reception", "Describe the {descriptor} '{name}' and how critics received it.", None),
    ],
    "place": [
        ("geography", "Describe the geography and history of {name}.", None),
        ("visit", "Tell me about {name}: where it is and what it is known for.", None),
    ],
    "organisation": [
        ("org_history", "Write a short history of {name}.", None),
        ("what_does", "What does {name} do?", None),
    ],
    "event": [
        ("what_happened", "What happened at {name}?", None),
        ("causes", "Describe the causes and consequences of {name}.", None),
    ],
    "substance": [
        ("properties", "Describe the properties and uses of {name}.", None),
    ],
    "species": [
        ("species_describe", "Describe the appearance and behaviour of {name}.", None),
    ],
    "product": [
        ("features", "Describe the main features of {name}.", None),
    ],
    "disease": [
        ("symptoms", "Describe the symptoms and treatment of {name}.", None),
    ],
    "invention": [
        ("how_works", "Explain how {name} works and who invented it.", None),
    ],
}


def _fits(entity: MadeUpEntity, descriptors: tuple[str, ...] | None) -> bool:
    return descriptors is None or entity.descriptor in descriptors


def templates(entity: MadeUpEntity, long: bool) -> list[tuple[str, str]]:
    """``(key, template)`` pairs that fit ``entity`` (kind and descriptor)."""
    table = (_LONG_COMMON + _LONG.get(entity.kind, [])) if long else _SHORT[entity.kind]
    skip = _PEOPLE_SKIP if entity.kind == "person" else frozenset()
    return [
        (key, template) for key, template, only in table if _fits(entity, only) and key not in skip
    ]


def described(entity: MadeUpEntity) -> str:
    """The name with its descriptor ("the novelist Elena Marsh", "the drug velorine") unless
    the name already says what it is ("Lake Vell", "the Treaty of Osk", "nysturnol acid")."""
    coined = {word.lower() for word in entity.coined}
    extra = [w for w in entity.name.lower().split() if w not in coined]
    if entity.kind != "person" and extra:
        return entity.name
    return f"the {entity.descriptor} {entity.name}"


def fill(template: str, entity: MadeUpEntity) -> str:
    """The template with the entity's name, descriptor and creator."""
    name = entity.name
    if "'{name}'" in template:  # a quoted title carries no article of its own
        name = entity.bare_name
    text = template.format(
        name=name,
        Name=name[:1].upper() + name[1:],
        descriptor=entity.descriptor,
        described=described(entity),
        creator=entity.creator or "",
    )
    return text.replace("..", ".")  # "Tell me about Vell United F.C.."


def generic_long_requests(name: str) -> list[str]:
    """The long-form requests that fit any entity, about a given (real) ``name``."""
    return [
        template.replace("{described}", name).format(name=name)
        for key, template, only in _LONG_COMMON
        if only is None and key != "explain_what"
    ]
