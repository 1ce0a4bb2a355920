"""Cleaning rules: decide for every source row whether it is clean and, if not, every reason why.

The rules run on the normalised row (see :mod:`formats`), so "empty", "duplicate" and "contaminated"
are judged after whitespace and Unicode normalisation, which is what the model will actually see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # json.dumps' string encoder
from pathlib import Path
from typing import Any, NamedTuple

from lora_pipeline.data.dedup import FingerprintSet
from lora_pipeline.data.formats import detect_format, normalise_record
from lora_pipeline.data.reasons import REASONS, DataError, ordered
from lora_pipeline.data.sources import DataSource, SourceRow, resolve_source
from lora_pipeline.data.text import fingerprint, fingerprint_bytes, matching_key

STRUCTURAL = frozenset({"missing_field", "wrong_type"})


def roles_alternate(roles: Sequence[str]) -> bool:
    """After an optional leading system turn, roles go user, assistant, user, ... (no other roles)."""
    body = roles[1:] if roles and roles[0] == "system" else roles
    return bool(body) and all(role == ("user", "assistant")[i % 2] for i, role in enumerate(body))


def content_problems(row: dict[str, Any]) -> set[str]:
    """``empty_text`` / ``bad_roles`` of a normalised row (the rules read_messages enforces too)."""
    if "text" in row:
        return set() if row["text"] else {"empty_text"}
    messages = row["messages"]
    problems = set()
    if not messages or any(not message["content"] for message in messages):
        problems.add("empty_text")
    roles = [message["role"] for message in messages]
    if messages and not (roles_alternate(roles) and roles[-1] == "assistant"):
        problems.add("bad_roles")
    return problems


def prompt_text(row: dict[str, Any]) -> str:
    """What decontamination compares: the user turns (the whole text for ``text`` rows)."""
    if "text" in row:
        return row["text"]
    return "\n".join(message["content"] for message in row["messages"] if message["role"] == "user")


def _texts(row: dict[str, Any]) -> Iterator[str]:
    if "text" in row:
        yield row["text"]
    else:
        yield from (message["content"] for message in row["messages"])


def row_line(row: dict[str, Any]) -> bytes:
    """A normalised row as its ``clean.jsonl`` line: ``json.dumps(row, ensure_ascii=False)``, UTF-8, newline.

    Normalised rows are built with a fixed key order (``messages`` / ``role`` / ``content``, or ``text``),
    so two rows are equal exactly when their lines are: the line is also what duplicates are found by.
    Their two shapes are written out directly with the string encoder ``json.dumps`` itself uses (4x faster
    than the generic encoder, byte for byte the same).
    """
    quote = encode_basestring
    if "messages" in row and len(row) == 1:
        turns = ", ".join(['{"role": ' + quote(turn["role"]) + ', "content": ' + quote(turn["content"]) + "}"
                           for turn in row["messages"]])
        return ('{"messages": [' + turns + "]}\n").encode("utf-8")
    if "text" in row and len(row) == 1:
        return ('{"text": ' + quote(row["text"]) + "}\n").encode("utf-8")
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


class Verdict(NamedTuple):
    """The outcome for one source row: the normalised row and its reasons (empty = clean).

    (A named tuple, not a dataclass: one is made per source row, and a tuple is made twice as fast.)
    """

    row: dict[str, Any] | None
    reasons: list[str]
    content_hash: int | None = None  # fingerprint of the normalised row (what duplicates are found by)
    detail: str | None = None  # why, in words, when the reason code alone does not say (template errors)
    prompt_key: int | None = None  # fingerprint of the normalised prompt (decontamination, held-out split)
    jsonl: bytes | None = None  # the normalised row's JSONL line (:func:`row_line`), written if it is clean

    @property
    def clean(self) -> bool:
        return not self.reasons


class RowChecker:
    """Applies every rule to a stream of rows; remembers fingerprints to find duplicates.

    Memory grows by one 64-bit fingerprint (8 bytes, in a :class:`~lora_pipeline.data.dedup.FingerprintSet`)
    per distinct normalised row: exact de-duplication has to remember what it has seen. The texts
    themselves are never kept.
    """

    def __init__(self, data_format: str, special_tokens: Iterable[str] = (),
                 contaminated_prompts: frozenset[int] | set[int] = frozenset()) -> None:
        self.data_format = data_format
        tokens = sorted({token for token in special_tokens if token}, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._contaminated = contaminated_prompts
        self._seen = FingerprintSet()

    def check(self, source_row: SourceRow) -> Verdict:
        """Normalise one source row and collect every reason that applies to it."""
        return self.check_batch([source_row])[0]

    def check_batch(self, source_rows: Sequence[SourceRow]) -> list[Verdict]:
        """:meth:`check` for consecutive rows, in order (duplicates are looked up once per batch)."""
        pending: list[tuple[int, dict[str, Any], set[str], bytes, int, int | None]] = []
        verdicts: list[Verdict | None] = [None] * len(source_rows)
        special = self._special
        for index, source_row in enumerate(source_rows):
            if source_row.unparseable:
                verdicts[index] = Verdict(None, ["unparseable"])
                continue
            parsed = normalise_record(source_row.record, self.data_format)
            if parsed.row is None:
                verdicts[index] = Verdict(None, ordered(parsed.reasons))
                continue
            row = parsed.row
            reasons = parsed.reasons | content_problems(row)
            if special is not None and any(special.search(text) for text in _texts(row)):
                reasons.add("special_token_in_text")
            line = row_line(row)
            prompt = matching_key(prompt_text(row))
            prompt_key = fingerprint(prompt) if prompt else None
            if prompt_key is not None and prompt_key in self._contaminated:
                reasons.add("contaminated")
            pending.append((index, row, reasons, line, fingerprint_bytes(line), prompt_key))
        # Every normalised row registers its fingerprint, so repeats of a rejected row are also
        # reported as duplicates: the first occurrence always keeps only its own reasons.
        repeated = self._seen.add_batch([key for *_, key, _ in pending])
        for (index, row, reasons, line, key, prompt_key), duplicate in zip(pending, repeated, strict=True):
            if duplicate:
                reasons.add("duplicate")
            verdicts[index] = Verdict(row, ordered(reasons), key, prompt_key=prompt_key, jsonl=line)
        return verdicts  # type: ignore[return-value]  # every slot is filled


def strict_rows(source: str | Path, data_format: str) -> Iterator[dict[str, Any]]:
    """Normalised rows of ``source``; the first invalid row raises (no quarantine, no de-duplication).

    Raises:
        DataError: unreadable source, or a row breaking a rule; names the file, line/row and rule.
    """
    src = resolve_source(source)
    for source_row in src.rows():
        if source_row.unparseable:
            problems = {"unparseable"}
        else:
            parsed = normalise_record(source_row.record, data_format)
            problems = parsed.reasons | (content_problems(parsed.row) if parsed.row is not None else set())
        if problems:
            detail = "; ".join(f"{code} ({REASONS[code]})" for code in ordered(problems))
            raise DataError(f"{src.name} {src.unit} {source_row.line}: invalid {data_format} row: {detail}")
        yield parsed.row  # type: ignore[misc]  # row is set when there are no problems


@dataclass
class ContaminationIndex:
    """Fingerprints of the normalised prompts of held-out sets, and what they were built from."""

    prompts: set[int] = field(default_factory=set)
    files: list[str] = field(default_factory=list)
    n_rows: int = 0
    n_skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "n_rows": self.n_rows, "n_prompts": len(self.prompts),
                "n_skipped_rows": self.n_skipped}


def build_contamination_index(paths: Sequence[Path]) -> ContaminationIndex:
    """Fingerprint the prompts of every held-out set (format detected per row from its keys).

    Held-out files are read leniently: a row that cannot be normalised is counted and skipped, since
    it cannot match a training prompt anyway and the eval stage reports it in its own terms.

    Raises:
        DataError: a file is missing or unreadable.
    """
    index = ContaminationIndex()
    for path in paths:
        src: DataSource = resolve_source(Path(path))
        index.files.append(src.name)
        for source_row in src.rows():
            index.n_rows += 1
            data_format = None if source_row.unparseable else detect_format(source_row.record)
            parsed = normalise_record(source_row.record, data_format) if data_format else None
            prompt = matching_key(prompt_text(parsed.row)) if parsed and parsed.row is not None else ""
            if prompt:
                index.prompts.add(fingerprint(prompt))
            else:
                index.n_skipped += 1
    return index
