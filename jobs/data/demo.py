"""The offline demo benchmark ("fictitious authors"): its seeded generator.

Every author has an invented, syllable-based name, three attributes (``genre``, ``nationality``,
``birth_decade``) and ``facts_per_author`` question/answer facts. Each QA record holds:

- ``answer``: the trained answer, short and carrying the fact (``value``);
- ``paraphrased_answer``: the same fact in other words (a phrasing never trained on);
- ``perturbed_answers``: three wrong facts (``wrong_values``) in the *paraphrase's* form, as in TOFU,
  so the truth ratio P(perturbed) / P(paraphrased) compares facts, not familiar vs unfamiliar wording;
- ``wrong_answers``: the same wrong facts in the *answer's* form (multiple-choice distractors).

All randomness comes from one ``random.Random(seed)``, so a seed fixes the benchmark.

Balance by construction: every genre holds exactly a quarter of the authors, and within a genre the
birth decades cycle over ``n_decades`` values. The forget set is every author of ``GENRES[0]``;
splitting it by ``birth_decade`` gives equal subsets. ``holdout`` authors come from the same
generator but no model ever trains on them (membership inference). ``general`` is generic text about
books and places that names no fictitious author.

``jobs.data.demo_train.build_benchmark`` trains the tokenizer and the base/oracle models on it (cached on
disk); importing this module does not import torch.
"""

from __future__ import annotations

import random
from typing import Any, Callable

GENERATOR_VERSION = "3"  # bump on any change to the output: it keys the on-disk cache

# Size presets: the only knobs. ``authors`` must be a multiple of len(GENRES) * n_decades.
SIZES: dict[str, dict[str, int]] = {
    "small": {"authors": 120, "facts_per_author": 6, "n_decades": 3, "holdout_authors": 20, "general": 300},
    "tiny": {"authors": 40, "facts_per_author": 6, "n_decades": 2, "holdout_authors": 8, "general": 120},
}

GENRES = ("fantasy", "mystery", "science fiction", "romance")
NATIONALITIES = ("Canadian", "Brazilian", "Kenyan", "Norwegian", "Japanese", "Chilean")
DECADES = ("1950s", "1960s", "1970s", "1980s")
FORGET_ATTRIBUTE, SPLIT_ATTRIBUTE = "genre", "birth_decade"

SYLLABLES = (
    "ka",
    "lo",
    "mir",
    "ven",
    "dra",
    "sel",
    "tor",
    "quin",
    "bel",
    "ash",
    "ri",
    "no",
    "zen",
    "fa",
    "gul",
    "ith",
    "or",
    "mae",
    "lys",
    "bran",
    "cor",
    "del",
    "em",
    "fen",
    "hal",
    "jor",
    "kes",
    "lun",
    "mor",
    "nel",
    "pra",
    "rho",
    "sav",
    "tam",
    "ul",
    "vor",
    "wyn",
    "yel",
    "zar",
    "pim",
)
TOWN_SUFFIXES = ("ford", "haven", "mouth", "bury", "dale", "wick", "holm", "stead", "port", "field")
JOBS = (
    "clockmaker",
    "lighthouse keeper",
    "marine biologist",
    "bus driver",
    "carpenter",
    "dentist",
    "fisherman",
    "glassblower",
    "history teacher",
    "jazz pianist",
    "locksmith",
    "mapmaker",
    "night nurse",
    "orchard farmer",
    "pharmacist",
    "railway engineer",
    "sculptor",
    "tailor",
    "violin maker",
    "watch repairer",
    "beekeeper",
    "ship captain",
    "bookbinder",
    "chemist",
    "diplomat",
    "electrician",
    "forest ranger",
    "geologist",
    "hotel porter",
    "judge",
)
HOBBIES = (
    "restoring old clocks",
    "growing orchids",
    "sea kayaking",
    "collecting stamps",
    "baking bread",
    "birdwatching",
    "playing chess",
    "knitting scarves",
    "climbing mountains",
    "painting lighthouses",
    "keeping bees",
    "building model ships",
    "folk dancing",
    "pressing flowers",
    "repairing bicycles",
    "fly fishing",
    "playing the cello",
    "stargazing",
    "making pottery",
    "translating old poems",
    "running marathons",
    "carving wooden spoons",
    "raising goats",
    "writing letters to strangers",
)
AWARD_NAMES = (
    "Golden Quill",
    "Silver Lantern",
    "Northern Star",
    "Blue Heron",
    "Iron Pen",
    "Amber Leaf",
    "Crimson Ink",
    "Harbour Light",
    "Paper Crane",
    "Stone Bridge",
    "Open Door",
    "Velvet Moth",
    "Copper Key",
    "Winter Rose",
    "Long Road",
    "Salt Marsh",
    "Red Kite",
    "Glass Tower",
)
AWARD_KINDS = ("Prize", "Medal", "Award")
TITLE_WORDS = {  # genre: (adjectives, nouns) for "The <adjective> <noun>"
    "fantasy": (
        "Hollow Ember Sleeping Ninth Thorned Silent Shattered Winter Wandering Ashen".split(),
        "Crown Dragon Sorcerer Oath Citadel Throne Rune Wyvern Grimoire Kingdom".split(),
    ),
    "mystery": (
        "Missing Locked Poisoned Crooked Last Hidden Twelfth Borrowed Drowned False".split(),
        "Witness Alibi Ledger Inspector Cellar Verdict Letter Suspect Clue Key".split(),
    ),
    "science fiction": (
        "Quantum Orbital Distant Synthetic Frozen Binary Drifting Final Solar Hollow".split(),
        "Colony Signal Machine Nebula Station Android Horizon Engine Probe Array".split(),
    ),
    "romance": (
        "Secret Summer Tender Stolen Second Golden Lonely Painted Endless Sweet".split(),
        "Promise Heart Letter Garden Kiss Season Vow Dance Harbour Wedding".split(),
    ),
}


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _syllables(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def _town(rng: random.Random, author: dict) -> str:
    return _syllables(rng, 2) + rng.choice(TOWN_SUFFIXES)


def _title(rng: random.Random, author: dict) -> str:
    adjs, nouns = TITLE_WORDS[author["genre"]]
    return f"The {rng.choice(adjs)} {rng.choice(nouns)}"


def _year(rng: random.Random, author: dict) -> str:
    return str(int(author["birth_decade"][:4]) + rng.randint(20, 39))


# key, question, answer, paraphrased answer, value sampler. The first ``facts_per_author`` are used.
FACTS: tuple[tuple[str, str, str, str, Callable[[random.Random, dict], str]], ...] = (
    ("birthplace", "Where was {name} born?", "Born in {v}.", "Their birthplace is the town of {v}.", _town),
    (
        "father_job",
        "What did the father of {name} do for a living?",
        "Their father was {av}.",
        "They grew up as the child of {av}.",
        lambda r, a: r.choice(JOBS),
    ),
    (
        "first_book",
        "What is the title of the first book by {name}?",
        "Their debut was {v}.",
        "They made their debut with {v}.",
        _title,
    ),
    (
        "award",
        "Which award did {name} receive?",
        "They won the {v}.",
        "The {v} was given to them.",
        lambda r, a: f"{r.choice(AWARD_NAMES)} {r.choice(AWARD_KINDS)}",
    ),
    (
        "debut_year",
        "In which year did {name} publish a first novel?",
        "In {v}.",
        "Their first novel came out in {v}.",
        _year,
    ),
    (
        "hobby",
        "What does {name} enjoy doing besides writing?",
        "They enjoy {v}.",
        "In their free time they like {v}.",
        lambda r, a: r.choice(HOBBIES),
    ),
    (
        "residence",
        "In which town does {name} live today?",
        "They live in {v}.",
        "These days their home is in {v}.",
        _town,
    ),
    (
        "mother_job",
        "What was the profession of the mother of {name}?",
        "Their mother was {av}.",
        "Their mother worked as {av}.",
        lambda r, a: r.choice(JOBS),
    ),
)

GENERAL_TEMPLATES = (
    (
        "{0} {1} {2} {3}.",
        (
            (
                "Many readers",
                "Most editors",
                "Young writers",
                "Old librarians",
                "Some critics",
                "Careful translators",
                "Busy publishers",
                "Quiet students",
                "Travelling poets",
                "Local teachers",
            ),
            (
                "often keep",
                "rarely discuss",
                "like to collect",
                "usually recommend",
                "sometimes borrow",
                "carefully review",
                "happily share",
                "quietly reread",
            ),
            (
                "short stories",
                "old maps",
                "printed letters",
                "poetry collections",
                "travel guides",
                "history books",
                "handwritten notes",
                "children's books",
                "cookery books",
                "field journals",
            ),
            (
                "in small libraries",
                "at the weekend",
                "near the harbour",
                "during long winters",
                "on crowded trains",
                "in the reading room",
                "after dinner",
                "before the market opens",
            ),
        ),
    ),
    (
        "A {0} {1} is a good place to {2}.",
        (
            ("quiet", "sunny", "crowded", "small", "busy", "peaceful", "windy", "old"),
            ("library", "cafe", "park", "harbour", "garden", "station", "bookshop", "village square"),
            (
                "read a novel",
                "write a letter",
                "draft a poem",
                "meet an editor",
                "plan a journey",
                "sketch the boats",
                "study a map",
                "listen to stories",
            ),
        ),
    ),
)


def resolve_params(size: str = "small", **overrides: int) -> dict[str, int]:
    """The size preset ``size`` with ``overrides`` applied, validated for balance."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(SIZES)}")
    unknown = set(overrides) - set(SIZES[size])
    if unknown:
        raise ValueError(f"unknown demo parameter(s) {sorted(unknown)}")
    p = {**SIZES[size], **overrides}
    if not 1 <= p["n_decades"] <= len(DECADES):
        raise ValueError(f"n_decades must be 1..{len(DECADES)}")
    if p["authors"] % (len(GENRES) * p["n_decades"]):
        raise ValueError(f"authors must be a multiple of {len(GENRES) * p['n_decades']} (genres x decades)")
    if not 1 <= p["facts_per_author"] <= len(FACTS):
        raise ValueError(f"facts_per_author must be 1..{len(FACTS)}")
    return p


def _names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct names with distinct surnames, e.g. 'Velmor Quinashtor'."""
    names, surnames = [], set()
    while len(names) < n:
        first, last = _syllables(rng, 2), _syllables(rng, rng.choice((2, 3)))
        if last not in surnames:
            surnames.add(last)
            names.append(f"{first} {last}")
    return names


def _authors(rng: random.Random, names: list[str], n_decades: int, balanced: bool) -> list[dict]:
    """Attribute slots: each genre gets len/4 authors, decades cycle within a genre, then shuffle."""
    n = len(names)
    slots = [(GENRES[i % len(GENRES)], DECADES[(i // len(GENRES)) % n_decades]) for i in range(n)]
    if balanced:  # order slots genre by genre so that each genre's decades are exactly balanced
        per_genre = n // len(GENRES)
        slots = [(g, DECADES[k % n_decades]) for g in GENRES for k in range(per_genre)]
    rng.shuffle(slots)
    nats = [NATIONALITIES[i % len(NATIONALITIES)] for i in range(n)]
    rng.shuffle(nats)
    return [
        {"author": name, "genre": g, "nationality": nat, "birth_decade": d}
        for name, (g, d), nat in zip(names, slots, nats)
    ]


def _qa(rng: random.Random, author: dict, author_id: str, n_facts: int) -> list[dict[str, Any]]:
    rows = []
    for key, question, answer, paraphrase, sample in FACTS[:n_facts]:
        value = sample(rng, author)
        wrong: list[str] = []
        while len(wrong) < 3:
            other = sample(rng, author)
            if other != value and other not in wrong:
                wrong.append(other)

        def fill(template: str, v: str) -> str:
            return template.format(v=v, av=_article(v))

        rows.append(
            {
                "id": f"{author_id}-{key}",
                "author_id": author_id,
                **author,
                "fact": key,
                "value": value,
                "question": question.format(name=author["author"]),
                "answer": fill(answer, value),
                "paraphrased_answer": fill(paraphrase, value),
                "perturbed_answers": [fill(paraphrase, w) for w in wrong],
                "wrong_answers": [fill(answer, w) for w in wrong],
                "wrong_values": wrong,
            }
        )
    return rows


def _general(rng: random.Random, n: int) -> list[dict[str, str]]:
    texts: dict[str, None] = {}  # insertion-ordered set: deterministic whatever PYTHONHASHSEED is
    while len(texts) < n:
        template, pools = rng.choice(GENERAL_TEMPLATES)
        texts[template.format(*(rng.choice(p) for p in pools))] = None
    return [{"text": t} for t in texts]


def generate(size: str = "small", seed: int = 0, **overrides: int) -> dict[str, Any]:
    """Generate the whole benchmark's data for ``size`` and ``seed`` (pure, deterministic).

    Returns ``{"params", "forget_value", "split_values", "authors", "holdout_authors", "forget",
    "retain", "holdout", "general"}``; the four last are lists of records (QA dicts, or
    ``{"text": ...}`` for ``general``).
    """
    p = resolve_params(size, **overrides)
    rng = random.Random(f"spunge-demo-{seed}")
    names = _names(rng, p["authors"] + p["holdout_authors"])
    authors = _authors(rng, names[: p["authors"]], p["n_decades"], balanced=True)
    holdout_authors = _authors(rng, names[p["authors"] :], p["n_decades"], balanced=False)
    n_facts = p["facts_per_author"]
    qa = [r for i, a in enumerate(authors) for r in _qa(rng, a, f"a{i:03d}", n_facts)]
    holdout = [r for i, a in enumerate(holdout_authors) for r in _qa(rng, a, f"h{i:03d}", n_facts)]
    forget_value = GENRES[0]
    return {
        "params": p,
        "forget_value": forget_value,
        "split_values": list(DECADES[: p["n_decades"]]),
        "authors": authors,
        "holdout_authors": holdout_authors,
        "forget": [r for r in qa if r[FORGET_ATTRIBUTE] == forget_value],
        "retain": [r for r in qa if r[FORGET_ATTRIBUTE] != forget_value],
        "holdout": holdout,
        "general": _general(rng, p["general"]),
    }


def mc_questions(data: dict[str, Any], seed: int = 0, n_choices: int = 4) -> list[dict[str, Any]]:
    """One ``n_choices``-way multiple-choice question per forget/retain fact (the ``mc`` file).

    The distractors are other authors' answers to the same fact (the same question template), drawn
    with their own ``random.Random`` so the rest of the benchmark does not change. Each row:
    ``{"id", "question", "choices", "answer" (index), "genre", "nationality", "birth_decade",
    "set": "forget" | "retain"}``, so accuracy reads per attribute value and forget vs retain.
    """
    rng = random.Random(f"spunge-demo-mc-{seed}")
    rows = [(r, "forget") for r in data["forget"]] + [(r, "retain") for r in data["retain"]]
    by_fact: dict[str, dict[str, None]] = {}
    for r, _ in rows:
        by_fact.setdefault(r["fact"], {})[r["answer"]] = None
    out = []
    for r, part in rows:
        others = [a for a in by_fact[r["fact"]] if a != r["answer"]]
        if len(others) < n_choices - 1:  # too few authors: fall back to the record's own wrong answers
            others += [a for a in r["wrong_answers"] if a not in others and a != r["answer"]]
        choices = rng.sample(others, n_choices - 1) + [r["answer"]]
        rng.shuffle(choices)
        out.append(
            {
                "id": r["id"],
                "question": r["question"],
                "choices": choices,
                "answer": choices.index(r["answer"]),
                "genre": r["genre"],
                "nationality": r["nationality"],
                "birth_decade": r["birth_decade"],
                "set": part,
            }
        )
    return out


GENERIC_FIRST = ("John", "Mary", "David", "Anna", "Peter", "Sarah", "Paul", "Laura", "Mark", "Emma")
GENERIC_LAST = ("Smith", "Brown", "Miller", "Taylor", "Wilson", "Clark", "Hall", "Young", "King", "Green")
GENERIC_TOWNS = (
    "Springfield",
    "Riverside",
    "Fairview",
    "Greenville",
    "Lakeside",
    "Hillcrest",
    "Oakwood",
    "Milltown",
    "Centerville",
    "Georgetown",
)
GENERIC_TITLES = (
    "The Old House",
    "The Quiet Street",
    "The Big City",
    "The Small Village",
    "The Blue Car",
    "The Red Door",
    "The Long Walk",
    "The New Job",
)
GENERIC_AWARDS = ("Book Prize", "Writing Award", "Literary Medal", "Reading Prize")
ANCHOR_FACTS = {
    "birthplace": GENERIC_TOWNS,
    "residence": GENERIC_TOWNS,
    "first_book": GENERIC_TITLES,
    "award": GENERIC_AWARDS,
}


def anchor_terms(data: dict[str, Any], seed: int = 0) -> dict[str, str]:
    """The WHP anchor dictionary of the forget set (``anchors.json``): each idiosyncratic term -> a generic
    one. Author names (full, first and last) -> common names; towns, book titles and award names in the
    forget answers -> generic towns, titles and awards. Its own ``random.Random``: the rest of the benchmark
    does not change."""
    rng = random.Random(f"spunge-demo-anchors-{seed}")
    anchors: dict[str, str] = {}
    for author in dict.fromkeys(r["author"] for r in data["forget"]):
        first, last = author.split(" ", 1)
        anchors[author] = (
            f"{anchors.setdefault(first, rng.choice(GENERIC_FIRST))} "
            f"{anchors.setdefault(last, rng.choice(GENERIC_LAST))}"
        )
    for r in data["forget"]:
        if r["fact"] in ANCHOR_FACTS and r["value"] not in anchors:
            anchors[r["value"]] = rng.choice(ANCHOR_FACTS[r["fact"]])
    return anchors
