"""A synthetic world to pretrain on: fictional people, their facts in paraphrased biographies, and questions.

No pretrained model can be downloaded here, so the embedded benchmark pretrains a small model on this world
until it answers closed-book questions about it. Every answer is one word, so exact match is unambiguous.
The downstream skill (`word_problems`) is unrelated: two-step arithmetic in words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = [
    "ba",
    "ko",
    "ri",
    "tel",
    "mun",
    "sa",
    "dor",
    "vi",
    "len",
    "qua",
    "zem",
    "fo",
    "ha",
    "pir",
    "nes",
    "gal",
    "tu",
    "wex",
    "yor",
    "cal",
]
CITIES = [
    "Lisbon",
    "Osaka",
    "Quito",
    "Tunis",
    "Tartu",
    "Perth",
    "Bergen",
    "Leipzig",
    "Cusco",
    "Dakar",
    "Hanoi",
    "Oslo",
    "Porto",
    "Riga",
    "Sapporo",
    "Tbilisi",
    "Valparaiso",
    "Windhoek",
    "Yerevan",
    "Zagreb",
    "Accra",
    "Bilbao",
    "Cork",
    "Daegu",
    "Esbjerg",
    "Fukuoka",
    "Graz",
    "Hobart",
    "Izmir",
    "Jaipur",
]
UNIVERSITIES = [
    "Aldmoor",
    "Brenfield",
    "Corvale",
    "Dunhallow",
    "Eastwick",
    "Fernmouth",
    "Glenrock",
    "Highmere",
    "Ivybridge",
    "Kestrel",
    "Lowmoor",
    "Marrow",
    "Northfell",
    "Oakhurst",
    "Pellham",
    "Ravenscar",
]
EMPLOYERS = [
    "Acmetron",
    "Bluvia",
    "Cobaltix",
    "Dynacorp",
    "Elmsoft",
    "Fluxon",
    "Gravitas",
    "Heliode",
    "Ionix",
    "Jetstream",
    "Kinetica",
    "Lumora",
    "Mantic",
    "Novalink",
    "Orbis",
    "Pyxel",
    "Quantal",
    "Rovia",
]
YEARS = [str(y) for y in range(1900, 2000)]
BOOKS = [str(n) for n in range(1, 21)]

ATTRIBUTES = {"city": CITIES, "university": UNIVERSITIES, "employer": EMPLOYERS, "year": YEARS, "books": BOOKS}
BIO_TEMPLATES = {
    "city": [
        "{name} was born in {city} .",
        "{name} came into the world in {city} .",
        "The birthplace of {name} is {city} .",
    ],
    "university": [
        "{name} studied at {university} .",
        "{name} graduated from {university} .",
        "{name} is an alumnus of {university} .",
    ],
    "employer": [
        "{name} works for {employer} .",
        "{name} is employed by {employer} .",
        "{name} has a job at {employer} .",
    ],
    "year": [
        "{name} was born in the year {year} .",
        "{name} arrived in {year} .",
        "The birth year of {name} is {year} .",
    ],
    "books": [
        "{name} has written {books} books .",
        "{name} is the author of {books} books .",
        "The number of books by {name} is {books} .",
    ],
}
QUESTION_TEMPLATES = {
    "city": ["Q : In which city was {name} born ? A :", "Q : Where is {name} from ? A :"],
    "university": ["Q : Which university did {name} attend ? A :", "Q : Where did {name} study ? A :"],
    "employer": ["Q : Which company does {name} work for ? A :", "Q : Who employs {name} ? A :"],
    "year": ["Q : In which year was {name} born ? A :", "Q : When was {name} born ? A :"],
    "books": ["Q : How many books has {name} written ? A :", "Q : How many books are by {name} ? A :"],
}
_TASK_NAMES = ["Tom", "Mia", "Sam", "Ana", "Leo", "Ivy", "Max", "Zoe"]
_ITEMS = ["apples", "coins", "stamps", "shells", "cards", "pens"]


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]


@dataclass(frozen=True)
class Example:
    """A prompt and its accepted answers; `text` is what training and calibration read."""

    prompt: str
    targets: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.targets[0]}"


def people(count: int, seed: int) -> list[Person]:
    rng = random.Random(seed)
    names = [a.capitalize() + b for a in _SYLLABLES for b in _SYLLABLES]
    pairs = rng.sample(range(len(names) ** 2), count)
    firsts, lasts = [names[p // len(names)] for p in pairs], [names[p % len(names)] for p in pairs]
    return [
        Person(f"{first} {last}", {k: rng.choice(v) for k, v in ATTRIBUTES.items()})
        for first, last in zip(firsts, lasts, strict=True)
    ]


def biography(person: Person, rng: random.Random) -> str:
    """One paraphrase of a person's facts, in random order and random templates."""
    attributes = list(person.facts)
    rng.shuffle(attributes)
    return " ".join(rng.choice(BIO_TEMPLATES[a]).format(name=person.name, **person.facts) for a in attributes)


def questions(person: Person) -> list[Example]:
    return [Example(t.format(name=person.name), (person.facts[a],)) for a, ts in QUESTION_TEMPLATES.items() for t in ts]


def pretraining_corpus(population: list[Person], bios_per_person: int, seed: int) -> list[str]:
    """Biographies plus question-answer lines for everyone: the knowledge the model must hold."""
    rng = random.Random(seed)
    texts = [biography(p, rng) for p in population for _ in range(bios_per_person)]
    texts += [q.text + " ." for p in population for q in questions(p)]
    rng.shuffle(texts)
    return texts


def word_problems(count: int, seed: int) -> list[Example]:
    """Distinct two-step arithmetic problems in words, answers 0–18: a skill the pretrained model never saw."""
    rng = random.Random(seed)
    out: dict[str, Example] = {}
    while len(out) < count:
        name, item = rng.choice(_TASK_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = rng.randint(0, min(a + b, 9))
        prompt = (
            f"Q : {name} has {a} {item} . {name} gets {b} more and gives away {c} . "
            f"How many {item} does {name} have now ? A :"
        )
        out.setdefault(prompt, Example(prompt, (str(a + b - c),)))
    return list(out.values())


def vocabulary(population: list[Person]) -> list[str]:
    """Every word the world and the task use, so the word-level tokenizer never needs <unk>."""
    words = {w for p in population for w in p.name.split()}
    for values in ATTRIBUTES.values():
        words.update(values)
    for templates in list(BIO_TEMPLATES.values()) + list(QUESTION_TEMPLATES.values()):
        for t in templates:
            words.update(w for w in t.split() if not w.startswith("{"))
    words.update(_TASK_NAMES + _ITEMS + [str(n) for n in range(0, 20)])
    words.update("has gets more and gives away How many does have now".split())
    return sorted(words)
