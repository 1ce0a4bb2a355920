"""The data stage: load -> normalise -> clean/quarantine -> GX-validate -> report."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.config import DataConfig
from lora_pipeline.data.cleaning import RowChecker, build_contamination_index, strict_rows
from lora_pipeline.data.expectations import SuiteBounds, SuiteRun
from lora_pipeline.data.profile import Profile
from lora_pipeline.data.report import build_report, failure_messages, reject_fraction
from lora_pipeline.data.sources import resolve_source
from lora_pipeline.data.writer import CLEAN_FILENAME, EVAL_FILENAME, QUARANTINE_FILENAME, split_source

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"


@dataclass(frozen=True)
class ValidationResult:
    """Everything the data stage produced (paths are under ``out_dir``)."""

    out_dir: Path
    clean_path: Path
    quarantine_path: Path
    report_path: Path
    data_docs_dir: Path | None
    n_input: int
    n_clean: int
    n_quarantined: int
    reason_counts: dict[str, int]
    success: bool
    failures: list[str]
    data_hash: str
    n_held_out: int = 0
    eval_path: Path | None = None  # the held-out split (``data.eval_path`` unset), else None


def validate_dataset(
    cfg: DataConfig,
    source: str | Path,
    out_dir: Path,
    *,
    special_tokens: Sequence[str] = (),
    decontaminate_against: Sequence[Path] = (),
    tokenizer: Any = None,
    stop_ids: Sequence[int] | None = None,
    held_out_fraction: float | None = None,
) -> ValidationResult:
    """Load, normalise, clean and validate a training set; quarantine rejected rows with reasons.

    Every source row ends up in exactly one of ``clean.jsonl`` and ``quarantine.jsonl``. The clean
    rows' derived columns are checked by a Great Expectations suite, in fixed-size chunks while the rows
    stream (every row is checked; memory does not grow with the row count), and the result JSON and Data
    Docs of the whole table are written under ``out_dir``.

    Args:
        cfg: The data config (``format``, ``min_rows``, ``max_reject_fraction``, ``max_length``).
        source: JSONL/JSON/CSV/Parquet file, ``save_to_disk`` directory, folder of data files, or a
            hub dataset id (``datasets.load_dataset(source, split="train")``).
        out_dir: Output directory (created).
        special_tokens: Tokenizer special tokens; rows whose text contains one are quarantined.
        decontaminate_against: Held-out sets (any supported format, detected per row); training rows
            whose normalised prompt appears in them are quarantined as ``contaminated``.
        tokenizer: The training tokenizer (with its chat template). When given, every row is also
            templated and truncated to ``max_length`` as training will do: rows with no trainable token
            are quarantined (``no_trainable_tokens``), and the GX suite checks the samples too
            (trainable tokens, token lengths, truncated fraction, a trained stop token after every answer).
        stop_ids: The model's stop set (:func:`lora_pipeline.formatting.stop_token_ids`); derived from
            the tokenizer alone when None.
        held_out_fraction: Hold this share of the clean rows (chosen by a hash of their prompt) out of
            training, into ``eval.jsonl`` (the evaluation stage's task rows when ``data.eval_path`` is
            unset); it fails when no row is held out.

    Returns:
        The :class:`ValidationResult`; ``success`` is False (with ``failures``) when the GX suite
        fails, too many rows are quarantined, or too few clean rows remain.

    Raises:
        DataError: the source (or a decontamination file) is missing or cannot be read at all.
    """
    started = time.perf_counter()
    with _long_lived_objects_frozen() as freeze:
        return _validate(cfg, source, out_dir, started, freeze, special_tokens=special_tokens,
                         decontaminate_against=decontaminate_against, tokenizer=tokenizer, stop_ids=stop_ids,
                         held_out_fraction=held_out_fraction)


@contextmanager
def _long_lived_objects_frozen() -> Iterator[Callable[[], None]]:
    """Keep long-lived objects (libraries, the tokenizer, the GX context) out of the cyclic garbage collector's full
    passes while the stage runs: each pass would walk all of them again, and streaming millions of rows triggers
    thousands of passes (about 15 % of the stage's time). Yields a function that freezes what exists now (call it
    once the stage's own long-lived objects are made). Left alone if the caller froze objects itself."""
    if gc.get_freeze_count():
        yield lambda: None
        return
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()


def _validate(cfg: DataConfig, source: str | Path, out_dir: Path, started: float, freeze: Callable[[], None], *,
              special_tokens: Sequence[str], decontaminate_against: Sequence[Path], tokenizer: Any,
              stop_ids: Sequence[int] | None, held_out_fraction: float | None) -> ValidationResult:
    src = resolve_source(source)
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    contamination = build_contamination_index(decontaminate_against)
    checker = RowChecker(cfg.format, special_tokens, contamination.prompts)
    chat = cfg.format != "text"
    bounds = SuiteBounds.from_config(cfg)
    suite = SuiteRun(bounds, chat, out_dir, tokens=tokenizer is not None)
    try:
        profile = Profile(chat, tokens=tokenizer is not None, on_chunk=suite.validate)
        freeze()  # the GX context and the contamination index live as long as the stage
        tally = split_source(src, checker, out_dir, chat=chat, tokenizer=tokenizer, max_length=cfg.max_length,
                             stop_ids=list(stop_ids) if stop_ids is not None else None,
                             held_out_fraction=held_out_fraction, profile=profile)
        del checker  # its fingerprints (8 bytes per distinct row) are not needed by the last GX steps
        profile.flush()
        gx = suite.finish(profile.stats)
    finally:
        suite.close()
    failures = failure_messages(cfg, src, tally, gx, held_out_fraction)
    success = gx.success and not failures
    seconds = time.perf_counter() - started
    report = build_report(cfg, src, tally, gx, bounds, failures=failures, success=success,
                          extra={"decontamination": contamination.to_dict(),
                                 "n_special_tokens": len(set(special_tokens)),
                                 "seconds": round(seconds, 3),
                                 "rows_per_second": round(tally.n_input / seconds, 1) if seconds > 0 else None})
    report_path = out_dir / REPORT_FILENAME
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    logger.info("data: %d rows from %s -> %d clean, %d held out for eval, %d quarantined (%.1f%%) %s; GX %s; "
                "%.0f rows/s", tally.n_input, src.name, tally.n_clean, tally.n_held_out, tally.n_quarantined,
                100 * reject_fraction(tally),
                dict(tally.reason_counts), "passed" if gx.success else "FAILED", tally.n_input / seconds)
    return ValidationResult(
        out_dir=out_dir,
        clean_path=out_dir / CLEAN_FILENAME,
        quarantine_path=out_dir / QUARANTINE_FILENAME,
        report_path=report_path,
        data_docs_dir=gx.data_docs_dir,
        n_input=tally.n_input,
        n_clean=tally.n_clean,
        n_quarantined=tally.n_quarantined,
        reason_counts=dict(sorted(tally.reason_counts.items())),
        success=success,
        failures=failures,
        data_hash=tally.data_hash,
        n_held_out=tally.n_held_out,
        eval_path=out_dir / EVAL_FILENAME if held_out_fraction else None,
    )


def read_messages(source: str | Path, data_format: str) -> list[dict]:
    """Load and normalise every row of ``source`` without quarantine (for eval and regression sets).

    Args:
        source: Any source :func:`validate_dataset` accepts.
        data_format: The rows' format (see ``DataConfig.format``).

    Returns:
        Normalised rows: ``{"messages": [...]}``, or ``{"text": ...}`` for the ``text`` format.

    Raises:
        DataError: the source is missing/unreadable, or a row is unparseable, lacks a field, has a
            wrong type, empty text or bad roles; the message names the file, line/row and rule.
    """
    return list(strict_rows(source, data_format))
