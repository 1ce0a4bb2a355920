"""Rows of the demo world: the base model's pre-training corpus, the task set and the held-out suites.

Skills the base model is pre-trained on (its regression suite): capital lookups and opposites in
several phrasings, copying word sequences, and word-by-word translation into Vornish. The task it
lacks: the same translation into Zerbic, a lexicon it has never used as one. Held-out rows are
decontaminated by construction: a regression prompt uses a phrasing held out for its fact or a
sequence never copied or translated in pre-training; an eval row uses a word sequence that no
training row contains, in any phrasing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_pipeline.demo_world.lexicon import (
    COPY_TEMPLATES,
    KNOWN_LANGUAGE,
    TASK_LANGUAGE,
    TRANSLATE_TEMPLATES,
    Lexicon,
)
from lora_pipeline.demo_world.spec import DemoWorldSpec

Row = dict[str, Any]

_PROSE_TEMPLATES: tuple[Callable[[random.Random, Lexicon], str], ...] = (
    lambda r, lx: "The capital of {0} is {1}.".format(*_country(r, lx)),
    lambda r, lx: "{1} lies in {0}.".format(*_country(r, lx)),
    lambda r, lx: "People of {0} often travel to {1}.".format(*_country(r, lx)),
    lambda r, lx: "The opposite of {0} is {1}.".format(*_opposite(r, lx)),
    lambda r, lx: "A {0} {1} saw a {2} {3}.".format(*r.choices(lx.english, k=4)),
    lambda r, lx: "The {0} and the {1} went to {2}.".format(*r.choices(lx.english, k=2), r.choice(lx.countries)),
)


def _country(rng: random.Random, lexicon: Lexicon) -> tuple[str, str]:
    i = rng.randrange(len(lexicon.countries))
    return lexicon.countries[i], lexicon.capitals[i]


def _opposite(rng: random.Random, lexicon: Lexicon) -> tuple[str, str]:
    fact = rng.choice([f for f in lexicon.facts if f.kind == "opposite"])
    return fact.subject, fact.answer


def chat_row(user: str, answer: str) -> Row:
    """One single-turn conversation in the OpenAI messages format."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@dataclass(frozen=True)
class WorldRows:
    """Everything the builder writes: pre-training corpus, task rows and held-out suites."""

    pretrain: list[Row]  # chat rows and {"text": ...} documents, shuffled
    train: list[Row]
    eval: list[Row]
    regression_qa: list[Row]
    regression_text: list[Row]


def _sequences(
    rng: random.Random, words: Sequence[str], spec: DemoWorldSpec, count: int,
    exclude: set[tuple[str, ...]], min_words: int,
) -> list[tuple[str, ...]]:
    """``count`` distinct random word sequences (uniform length) avoiding ``exclude``.

    Raises:
        ValueError: the spec asks for more distinct sequences than the vocabulary can give.
    """
    found: list[tuple[str, ...]] = []
    seen = set(exclude)
    for _ in range(50 * count + 1000):
        if len(found) == count:
            return found
        seq = tuple(rng.choices(words, k=rng.randint(min_words, spec.max_words)))
        if seq not in seen:
            seen.add(seq)
            found.append(seq)
    if len(found) < count:
        raise ValueError(f"cannot draw {count} distinct sequences of {min_words}-{spec.max_words} words "
                         f"from {len(words)} words: lower the row counts or raise lexicon_size/max_words")
    return found


def _translate_row(lexicon: Lexicon, seq: tuple[str, ...], language: str, rng: random.Random) -> Row:
    prompt = rng.choice(TRANSLATE_TEMPLATES).format(lang=language, x=" ".join(seq))
    return chat_row(prompt, " ".join(lexicon.translate(list(seq), language)))


def _copy_row(seq: tuple[str, ...], rng: random.Random) -> Row:
    return chat_row(rng.choice(COPY_TEMPLATES).format(x=" ".join(seq)), " ".join(seq))


def build_task_rows(spec: DemoWorldSpec, lexicon: Lexicon) -> tuple[list[Row], list[Row]]:
    """Training and held-out translation rows; eval sequences (>= 2 words) never occur in train."""
    rng = random.Random(f"task-{spec.seed}")
    train_seqs = _sequences(rng, lexicon.english, spec, spec.n_train_rows, set(), spec.min_words)
    eval_min = max(2, spec.min_words)  # a single word would only test a mapping seen in training
    eval_seqs = _sequences(rng, lexicon.english, spec, spec.n_eval_rows, set(train_seqs), eval_min)
    train = [_translate_row(lexicon, seq, TASK_LANGUAGE, rng) for seq in train_seqs]
    held_out = [_translate_row(lexicon, seq, TASK_LANGUAGE, rng) for seq in eval_seqs]
    return train, held_out


def _document(rng: random.Random, lexicon: Lexicon, n_sentences: int) -> str:
    return " ".join(rng.choice(_PROSE_TEMPLATES)(rng, lexicon) for _ in range(n_sentences))


def _documents(rng: random.Random, lexicon: Lexicon, spec: DemoWorldSpec, count: int, exclude: set[str]) -> list[str]:
    docs: list[str] = []
    seen = set(exclude)
    while len(docs) < count:  # the document space is astronomically larger than any count asked for
        doc = _document(rng, lexicon, spec.prose_sentences)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def _pretrain_dialogues(
    rng: random.Random, spec: DemoWorldSpec, lexicon: Lexicon
) -> tuple[list[Row], list[Row]]:
    """Chat rows of the base model's skills, and held-out regression rows of the same skills."""
    held_min = max(2, spec.min_words)
    copy_seqs = _sequences(rng, lexicon.copy_words, spec, spec.n_pretrain_copy_rows, set(), spec.min_words)
    held_copy = _sequences(rng, lexicon.copy_words, spec, spec.n_regression_copy_rows, set(copy_seqs), held_min)
    vorn_seqs = _sequences(rng, lexicon.english, spec, spec.n_pretrain_translate_rows, set(), spec.min_words)
    held_vorn = _sequences(rng, lexicon.english, spec, spec.n_regression_translate_rows, set(vorn_seqs), held_min)

    dialogues = [_copy_row(seq, rng) for seq in copy_seqs]
    dialogues += [_translate_row(lexicon, seq, KNOWN_LANGUAGE, rng) for seq in vorn_seqs]
    for fact in lexicon.facts:
        for index in range(len(fact.templates)):
            if index != fact.held_out:
                dialogues += [chat_row(fact.prompt(index), fact.answer)] * spec.fact_repeats
    regression = [chat_row(fact.prompt(fact.held_out), fact.answer) for fact in lexicon.facts]
    regression += [_copy_row(seq, rng) for seq in held_copy]
    regression += [_translate_row(lexicon, seq, KNOWN_LANGUAGE, rng) for seq in held_vorn]
    return dialogues, regression


def _with_replay(rng: random.Random, task_rows: list[Row], dialogues: list[Row], fraction: float) -> list[Row]:
    """Task rows plus distinct base-skill dialogues making up ``fraction`` of the result, shuffled.

    Mixing some of what the model already does into a narrow fine-tuning set is the usual guard
    against forgetting; the replayed rows come from pre-training, so none is a regression prompt.
    """
    n_replay = round(len(task_rows) * fraction / (1 - fraction))
    distinct = list({repr(row): row for row in dialogues}.values())
    mixed = task_rows + rng.sample(distinct, min(n_replay, len(distinct)))
    rng.shuffle(mixed)
    return mixed


def build_world_rows(spec: DemoWorldSpec, lexicon: Lexicon) -> WorldRows:
    """All rows of the world, deterministic from ``spec.seed``."""
    rng = random.Random(f"world-{spec.seed}")
    train, held_out = build_task_rows(spec, lexicon)
    pretrain, regression_qa = _pretrain_dialogues(rng, spec, lexicon)
    train = _with_replay(random.Random(f"replay-{spec.seed}"), train, pretrain, spec.task_replay_fraction)
    rng.shuffle(regression_qa)  # any prefix (eval.max_samples) then covers every skill
    docs = _documents(rng, lexicon, spec, spec.n_pretrain_prose_rows + spec.n_regression_text_rows, set())
    pretrain += [{"text": doc} for doc in docs[: spec.n_pretrain_prose_rows]]
    rng.shuffle(pretrain)
    regression_text = [{"text": doc} for doc in docs[spec.n_pretrain_prose_rows :]]
    return WorldRows(pretrain, train, held_out, regression_qa, regression_text)
