"""Stream a source through the cleaning rules into ``clean.jsonl`` and ``quarantine.jsonl``.

Rows are written as they are judged (bounded memory), to ``*.partial`` files renamed into place at
the end, so an interrupted run never leaves a truncated ``clean.jsonl`` that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.data.cleaning import RowChecker, Verdict
from lora_pipeline.data.profile import Profile
from lora_pipeline.data.sources import DataSource
from lora_pipeline.formatting import tokenize_row

CLEAN_FILENAME = "clean.jsonl"
QUARANTINE_FILENAME = "quarantine.jsonl"
#: Offending lines remembered per reason (for messages and the report); counts are always complete.
FIRST_LINES_KEPT = 20


@dataclass
class Tally:
    """Counts and first offending lines of one pass over a source."""

    profile: Profile
    n_input: int = 0
    n_clean: int = 0
    reason_counts: Counter[str] = field(default_factory=Counter)
    first_lines: dict[str, list[int]] = field(default_factory=dict)  # reason -> first source lines
    quarantined_lines: list[int] = field(default_factory=list)  # first quarantined source lines
    data_hash: str = ""

    @property
    def n_quarantined(self) -> int:
        return self.n_input - self.n_clean

    def reject(self, line: int, reasons: list[str]) -> None:
        self.reason_counts.update(reasons)
        for reason in reasons:
            kept = self.first_lines.setdefault(reason, [])
            if len(kept) < FIRST_LINES_KEPT:
                kept.append(line)
        if len(self.quarantined_lines) < FIRST_LINES_KEPT:
            self.quarantined_lines.append(line)


def _jsonable(value: Any) -> Any:
    # Arrow/parquet rows can hold bytes, dates or numpy scalars; the quarantine must never crash on them.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _json_line(payload: Any) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")


def split_source(src: DataSource, checker: RowChecker, out_dir: Path, *, chat: bool,
                 tokenizer: Any = None, max_length: int = 0) -> Tally:
    """Judge every row of ``src``; write clean rows and quarantined rows (with reasons) under ``out_dir``.

    Args:
        src: The resolved source.
        checker: The cleaning rules (holds duplicate/contamination state).
        out_dir: Receives ``clean.jsonl`` and ``quarantine.jsonl``.
        chat: Profile chat rows (True) or ``text`` rows (False).
        tokenizer: When given, each row that passes the text rules is templated and truncated to
            ``max_length`` as training will do: a row with no trainable token left is quarantined
            (``no_trainable_tokens``) and the profile gets the token columns.
        max_length: Token budget per sample (``data.max_length``).

    Returns:
        The tally; ``n_clean + n_quarantined == n_input`` by construction.

    Raises:
        DataError: the source cannot be read at all (per-row problems are quarantined instead).
    """
    tally = Tally(profile=Profile(chat, tokens=tokenizer is not None))
    digest = hashlib.sha256()
    clean_tmp = out_dir / (CLEAN_FILENAME + ".partial")
    quarantine_tmp = out_dir / (QUARANTINE_FILENAME + ".partial")
    try:
        with clean_tmp.open("wb") as clean, quarantine_tmp.open("wb") as quarantine:
            for source_row in src.rows():
                tally.n_input += 1
                verdict = checker.check(source_row)
                sample = None
                if verdict.clean and tokenizer is not None:
                    sample = tokenize_row(tokenizer, verdict.row, max_length)  # type: ignore[arg-type]
                    if not sample.n_trainable:
                        verdict = Verdict(verdict.row, ["no_trainable_tokens"], verdict.content_hash)
                if verdict.clean:
                    data = _json_line(verdict.row)
                    digest.update(data)
                    clean.write(data)
                    tally.n_clean += 1
                    tally.profile.add(source_row.line, verdict.row, verdict.content_hash,  # type: ignore[arg-type]
                                      sample, getattr(tokenizer, "eos_token_id", None))
                else:
                    quarantine.write(_json_line(
                        {"line": source_row.line, "reasons": verdict.reasons, "record": source_row.record}))
                    tally.reject(source_row.line, verdict.reasons)
        os.replace(clean_tmp, out_dir / CLEAN_FILENAME)
        os.replace(quarantine_tmp, out_dir / QUARANTINE_FILENAME)
    finally:
        clean_tmp.unlink(missing_ok=True)
        quarantine_tmp.unlink(missing_ok=True)
    tally.data_hash = digest.hexdigest()
    return tally
