"""Cleaning rules: decide for every source row whether it is clean and, if not, every reason why.

The rules run on the normalised row (see :mod:`formats`), so "empty", "duplicate" and "contaminated"
are judged after whitespace and Unicode normalisation, which is what the model will actually see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.data.formats import detect_format, normalise_record
from lora_pipeline.data.reasons import REASONS, DataError, ordered
from lora_pipeline.data.sources import DataSource, SourceRow, resolve_source
from lora_pipeline.data.text import fingerprint, matching_key

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


@dataclass(frozen=True)
class Verdict:
    """The outcome for one source row: the normalised row and its reasons (empty = clean)."""

    row: dict[str, Any] | None
    reasons: list[str]
    content_hash: int | None = None  # fingerprint of the normalised row (what duplicates are found by)
    detail: str | None = None  # why, in words, when the reason code alone does not say (template errors)
    prompt_key: int | None = None  # fingerprint of the normalised prompt (decontamination, held-out split)

    @property
    def clean(self) -> bool:
        return not self.reasons


class RowChecker:
    """Applies every rule to a stream of rows; remembers fingerprints to find duplicates.

    Memory grows by one 64-bit fingerprint per distinct row (exact de-duplication needs to remember
    what it has seen); the texts themselves are never kept.
    """

    def __init__(self, data_format: str, special_tokens: Iterable[str] = (),
                 contaminated_prompts: frozenset[int] | set[int] = frozenset()) -> None:
        self.data_format = data_format
        tokens = sorted({token for token in special_tokens if token}, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._contaminated = contaminated_prompts
        self._seen: set[int] = set()

    def check(self, source_row: SourceRow) -> Verdict:
        """Normalise one source row and collect every reason that applies to it."""
        if source_row.unparseable:
            return Verdict(None, ["unparseable"])
        parsed = normalise_record(source_row.record, self.data_format)
        if parsed.row is None:
            return Verdict(None, ordered(parsed.reasons))
        row, reasons = parsed.row, parsed.reasons | content_problems(parsed.row)
        if self._special is not None and any(self._special.search(text) for text in _texts(row)):
            reasons.add("special_token_in_text")
        # Every normalised row registers its fingerprint, so repeats of a rejected row are also
        # reported as duplicates: the first occurrence always keeps only its own reasons.
        key = fingerprint(json.dumps(row, sort_keys=True, ensure_ascii=False))
        if key in self._seen:
            reasons.add("duplicate")
        self._seen.add(key)
        prompt = matching_key(prompt_text(row))
        prompt_key = fingerprint(prompt) if prompt else None
        if prompt_key is not None and prompt_key in self._contaminated:
            reasons.add("contaminated")
        return Verdict(row, ordered(reasons), key, prompt_key=prompt_key)


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
