"""The fictional world's content: names, facts, word lists and phrasings, all drawn from the seed.

Fixed English word lists are content, not hyperparameters: how many of them are used is set by the
spec. Invented names (countries, capitals, Zerbic words) come from one syllable generator, so every
BPE piece of a Zerbic word is also seen in the base model's pre-training text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lora_pipeline.demo_world.spec import DemoWorldSpec

#: English words of the copy and translation skills (the first ``spec.lexicon_size`` are used).
ENGLISH_WORDS = (
    "red", "blue", "green", "black", "white", "gold", "cat", "dog", "fox", "owl", "bear", "fish",
    "tree", "stone", "river", "house", "boat", "star", "moon", "sun", "king", "bird", "ship", "road",
    "bread", "milk", "rain", "snow", "wolf", "horse", "door", "lamp",
)

#: Antonym pairs; both directions are facts the base model learns.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("old", "new"), ("happy", "sad"), ("light", "dark"), ("early", "late"), ("high", "low"),
    ("open", "closed"), ("full", "empty"), ("rich", "poor"), ("hard", "soft"), ("wet", "dry"),
    ("loud", "quiet"), ("long", "short"), ("strong", "weak"), ("first", "last"), ("inside", "outside"),
)

#: Question phrasings per fact kind. Each fact holds one phrasing out of pre-training (rotating over
#: facts), so a regression prompt is never seen verbatim but its fact and its phrasing both are.
CAPITAL_TEMPLATES = (
    "What is the capital of {x}?",
    "Name the capital city of {x}.",
    "Which city is the capital of {x}?",
    "Tell me the capital of {x}.",
    "The capital of {x} is which city?",
)
OPPOSITE_TEMPLATES = (
    "What is the opposite of {x}?",
    "Give the opposite of {x}.",
    "Which word is the opposite of {x}?",
    "Tell me the opposite of {x}.",
)
COPY_TEMPLATES = ("Repeat: {x}", "Say this again: {x}", "Copy exactly: {x}")
#: Word-by-word translation phrasings. The base model translates into Vornish (so it has the
#: mechanism: find the i-th word, map it); the task is the same phrasings with Zerbic, a lexicon it
#: has never seen used as one.
TRANSLATE_TEMPLATES = ("Translate to {lang}: {x}", "Say in {lang}: {x}", "{lang} for: {x}")
KNOWN_LANGUAGE = "Vornish"
TASK_LANGUAGE = "Zerbic"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "qu", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "k", "s")
_COUNTRY_SUFFIXES = ("land", "ia", "mark", "stan", "or", "heim")


@dataclass(frozen=True)
class Fact:
    """One question/answer fact: a subject, its answer, and which phrasing is held out."""

    kind: str
    subject: str
    answer: str
    templates: tuple[str, ...]
    held_out: int  # index into templates kept out of pre-training (the regression phrasing)

    def prompt(self, template_index: int) -> str:
        return self.templates[template_index].format(x=self.subject)


@dataclass(frozen=True)
class Lexicon:
    """All named things of one world."""

    countries: tuple[str, ...]
    capitals: tuple[str, ...]
    english: tuple[str, ...]
    vornish: tuple[str, ...]  # vornish[i] translates english[i]; the base model knows this lexicon
    zerbic: tuple[str, ...]  # zerbic[i] translates english[i]; the task to fine-tune
    facts: tuple[Fact, ...]

    @property
    def copy_words(self) -> tuple[str, ...]:
        """Vocabulary of the copy skill: English *and* Zerbic words, so Zerbic tokens are familiar."""
        return self.english + self.zerbic

    def translate(self, words: list[str], language: str) -> list[str]:
        """Word-by-word translation of English ``words`` into ``language`` (Vornish or Zerbic)."""
        target = {KNOWN_LANGUAGE: self.vornish, TASK_LANGUAGE: self.zerbic}[language]
        table = dict(zip(self.english, target, strict=True))
        return [table[word] for word in words]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _unique_names(rng: random.Random, count: int, make, taken: set[str]) -> tuple[str, ...]:
    names: list[str] = []
    while len(names) < count:
        name = make(rng)
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return tuple(names)


def build_lexicon(spec: DemoWorldSpec) -> Lexicon:
    """Invent the world's names and facts from ``spec.seed`` (same spec, same lexicon)."""
    rng = random.Random(f"lexicon-{spec.seed}")
    english = ENGLISH_WORDS[: spec.lexicon_size]
    # Reserve real words so no invented name collides with a word the skills use.
    taken = {w for pair in OPPOSITES for w in pair} | set(ENGLISH_WORDS)
    countries = _unique_names(
        rng, spec.n_countries, lambda r: (_syllable(r) + _syllable(r)).capitalize() + r.choice(_COUNTRY_SUFFIXES), taken
    )
    capitals = _unique_names(rng, spec.n_countries, lambda r: (_syllable(r) + _syllable(r)).capitalize(), taken)
    def word(r: random.Random) -> str:
        return _syllable(r) + (_syllable(r) if r.random() < 0.5 else "")

    vornish = _unique_names(rng, len(english), word, taken)
    zerbic = _unique_names(rng, len(english), word, taken)
    facts = [
        Fact("capital", country, capital, CAPITAL_TEMPLATES, i % len(CAPITAL_TEMPLATES))
        for i, (country, capital) in enumerate(zip(countries, capitals, strict=True))
    ]
    directed = [*OPPOSITES, *((b, a) for a, b in OPPOSITES)]
    facts += [
        Fact("opposite", word, answer, OPPOSITE_TEMPLATES, i % len(OPPOSITE_TEMPLATES))
        for i, (word, answer) in enumerate(directed)
    ]
    return Lexicon(countries, capitals, english, vornish, zerbic, tuple(facts))
