"""Stream a source through the cleaning rules into ``clean.jsonl`` and ``quarantine.jsonl``.

Rows are read and judged in small batches (:data:`ROW_BATCH`: duplicates are looked up, and rows
templated and tokenized, once per batch) and written as they are judged (bounded memory), to
``*.partial`` files renamed into place at the end, so an interrupted run never leaves a truncated
``clean.jsonl`` that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from lora_pipeline.data.cleaning import RowChecker, Verdict
from lora_pipeline.data.profile import Profile
from lora_pipeline.data.sources import DataSource, SourceRow
from lora_pipeline.data.tokens import BatchTokenizer, Prepared
from lora_pipeline.formatting import RowFormatError, stop_token_ids

CLEAN_FILENAME = "clean.jsonl"
QUARANTINE_FILENAME = "quarantine.jsonl"
EVAL_FILENAME = "eval.jsonl"
#: Resolution of the held-out split (fractions are honoured to 1e-6).
_SPLIT_BUCKETS = 1_000_000
#: Offending lines remembered per reason (for messages and the report); counts are always complete.
FIRST_LINES_KEPT = 20
#: Source rows judged together (one duplicate lookup and one batched tokenizer call per batch).
ROW_BATCH = 1024


@dataclass
class Tally:
    """Counts and first offending lines of one pass over a source."""

    profile: Profile
    n_input: int = 0
    n_clean: int = 0
    n_held_out: int = 0  # clean rows held out of training for evaluation
    reason_counts: Counter[str] = field(default_factory=Counter)
    first_lines: dict[str, list[int]] = field(default_factory=dict)  # reason -> first source lines
    quarantined_lines: list[int] = field(default_factory=list)  # first quarantined source lines
    data_hash: str = ""

    @property
    def n_quarantined(self) -> int:
        return self.n_input - self.n_clean - self.n_held_out

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


def is_held_out(prompt_key: int | None, fraction: float | None) -> bool:
    """Whether a row goes to the held-out eval split: decided by its prompt's fingerprint, so the split is
    deterministic, independent of row order, and a prompt never lands on both sides."""
    return bool(fraction) and prompt_key is not None and prompt_key % _SPLIT_BUCKETS < fraction * _SPLIT_BUCKETS


def _rejected(verdict: Verdict, reason: str, detail: str | None = None) -> Verdict:
    return Verdict(verdict.row, [reason], verdict.content_hash, detail=detail, prompt_key=verdict.prompt_key)


def split_source(src: DataSource, checker: RowChecker, out_dir: Path, *, chat: bool,
                 tokenizer: Any = None, max_length: int = 0, stop_ids: list[int] | None = None,
                 held_out_fraction: float | None = None, profile: Profile | None = None) -> Tally:
    """Judge every row of ``src``; write clean rows and quarantined rows (with reasons) under ``out_dir``.

    Args:
        src: The resolved source.
        checker: The cleaning rules (holds duplicate/contamination state).
        out_dir: Receives ``clean.jsonl``, ``quarantine.jsonl`` and, with ``held_out_fraction``, ``eval.jsonl``.
        chat: Profile chat rows (True) or ``text`` rows (False).
        tokenizer: When given, each row that passes the text rules is templated and truncated to
            ``max_length`` as training will do: a row with no trainable token left is quarantined
            (``no_trainable_tokens``), a row the chat template cannot format is quarantined
            (``template_error``), and the profile gets the token columns.
        max_length: Token budget per sample (``data.max_length``).
        stop_ids: The stop set every answer must end in (default: derived from the tokenizer).
        held_out_fraction: Hold this share of the clean rows out of training (see :func:`is_held_out`)
            into ``eval.jsonl``; they are not part of the training data, its hash or its profile.
        profile: Receives the clean rows' derived columns (default: a new one keeping the whole table);
            the data stage passes one that hands fixed-size chunks to the GX step.

    Returns:
        The tally; ``n_clean + n_held_out + n_quarantined == n_input`` by construction.

    Raises:
        DataError: the source cannot be read at all (per-row problems are quarantined instead).
    """
    tally = Tally(profile=profile if profile is not None else Profile(chat, tokens=tokenizer is not None))
    digest = hashlib.sha256()
    batch_tokenizer = None
    if tokenizer is not None:
        if stop_ids is None:
            stop_ids = stop_token_ids(tokenizer)  # once: deriving it renders the template
        batch_tokenizer = BatchTokenizer(tokenizer, max_length, stop_ids)
    add_to_profile = tally.profile.add
    names = (CLEAN_FILENAME, QUARANTINE_FILENAME, EVAL_FILENAME)
    partial = {name: out_dir / (name + ".partial") for name in names}

    def write(batch: list[SourceRow], verdicts: list[Verdict], judged: list[int], prepared: Prepared | None,
              encoded: Future | None) -> None:
        samples: list[Any] = [None] * len(batch)
        if prepared is not None:
            outcomes = batch_tokenizer.finish(prepared, encoded.result())  # type: ignore[union-attr]
            for i, outcome in zip(judged, outcomes, strict=True):
                if isinstance(outcome, RowFormatError):
                    verdicts[i] = _rejected(verdicts[i], "template_error", str(outcome))
                elif not outcome.n_trainable:
                    verdicts[i] = _rejected(verdicts[i], "no_trainable_tokens")
                else:
                    samples[i] = outcome
        for source_row, verdict, sample in zip(batch, verdicts, samples, strict=True):
            if verdict.clean and is_held_out(verdict.prompt_key, held_out_fraction):
                held_out.write(verdict.jsonl)  # type: ignore[arg-type]  # clean rows have their line
                tally.n_held_out += 1
            elif verdict.clean:
                data = verdict.jsonl
                digest.update(data)  # type: ignore[arg-type]
                clean.write(data)  # type: ignore[arg-type]
                tally.n_clean += 1
                add_to_profile(source_row.line, verdict.row, verdict.content_hash, sample)  # type: ignore[arg-type]
            else:
                entry = {"line": source_row.line, "reasons": verdict.reasons, "record": source_row.record}
                if verdict.detail:
                    entry["detail"] = verdict.detail
                quarantine.write(_json_line(entry))
                tally.reject(source_row.line, verdict.reasons)

    try:
        # The batched tokenizer call (Rust, without the GIL) runs in one worker thread, a batch behind: while
        # it tokenizes batch k, this thread reads, cleans and renders batch k + 1 (pure Python, no tokenizer);
        # then it waits for batch k and derives its counts and writes it, with no tokenizer call running.
        # Rows are written in source order.
        with partial[CLEAN_FILENAME].open("wb") as clean, partial[QUARANTINE_FILENAME].open("wb") as quarantine, \
                partial[EVAL_FILENAME].open("wb") as held_out, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-tokenizer") as worker:
            rows = src.rows()
            pending: tuple[list[SourceRow], list[Verdict], list[int], Prepared | None, Future | None] | None = None
            while batch := list(islice(rows, ROW_BATCH)):
                tally.n_input += len(batch)
                verdicts = checker.check_batch(batch)
                judged: list[int] = []
                prepared = None
                if batch_tokenizer is not None:
                    judged = [i for i, verdict in enumerate(verdicts) if verdict.clean]
                    prepared = batch_tokenizer.prepare([verdicts[i].row for i in judged])  # type: ignore[misc]
                if pending is not None:
                    write(*pending)  # waits for the worker: at most one batch is being tokenized
                encoded = worker.submit(batch_tokenizer.encode, prepared) if prepared is not None else None
                pending = (batch, verdicts, judged, prepared, encoded)
            if pending is not None:
                write(*pending)
        for name in names:
            if name != EVAL_FILENAME or held_out_fraction:
                os.replace(partial[name], out_dir / name)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    tally.data_hash = digest.hexdigest()
    return tally
