"""Great Expectations (1.x) suite over the derived-column table of the clean rows.

The cleaning rules already quarantine bad rows; this suite independently checks the contract of what
was written (roles, non-empty turns, uniqueness, row count, length distribution), so a regression in
the cleaning code, or data that is clean row by row but wrong as a whole (too few rows, lengths far
beyond the token budget), still stops the run. Results and Data Docs are written under ``out_dir``
through an ephemeral context: nothing goes to the working directory or a ``gx/`` project folder.

Every clean row is validated, in memory that does not grow with the row count (:class:`SuiteRun`):

* row-by-row expectations (values between, in a set, not null, column pairs equal, the column set) run
  in GX on consecutive fixed-size chunks of the table; their results add up exactly (element, unexpected
  and missing counts; the first offending rows are the first chunk's first, and so on);
* uniqueness of ``content_hash`` runs in GX on hash partitions of the whole table (every copy of a
  value lands in the same partition), read back from a ``(line, content_hash)`` file spilled to disk;
* the three whole-table aggregates (row count, median token length, mean truncated share) are computed
  exactly by the profile's streaming statistics and judged against the same bounds.

The aggregated result has the shape of a single GX run over the whole table: the same expectations in
the same order, the same counts and first offending lines, one ``gx_validation_result.json`` and one
Data Docs page.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_pipeline.config import DataConfig
from lora_pipeline.data.gx_results import LINE_COLUMN, PARTIAL_UNEXPECTED_ROWS, RowCounts, between

#: Generous ceiling on characters per token (BPE tokenizers average ~4 on English prose).
CHARS_PER_TOKEN_CEILING = 8
#: Share of rows that must fit the character budget; the rest are merely truncated by the format stage.
LENGTH_MOSTLY = 0.9
#: Smallest chat sample: one user turn and one assistant turn.
MIN_TURNS = 2
SUITE_NAME = "clean_rows"
RESULT_FILENAME = "gx_validation_result.json"
DATA_DOCS_DIRNAME = "data_docs"
HASH_COLUMN = "content_hash"
RESULT_FORMAT = {"result_format": "SUMMARY", "unexpected_index_column_names": [LINE_COLUMN],
                 "partial_unexpected_count": PARTIAL_UNEXPECTED_ROWS}
#: Rows per hash partition of the uniqueness check (two int64 columns: ~8 MB of table per partition).
UNIQUE_PARTITION_ROWS = 500_000
#: Rows read at a time from the spilled (line, content_hash) file.
_SPILL_BLOCK_ROWS = 1 << 20
_SPILL_FILENAME = ".gx_content_hashes.partial"
#: Expectations whose result is a row-by-row count (summed over chunks).
_ROW_EXPECTATIONS = ("expect_column_values_to_not_be_null", "expect_column_values_to_be_between",
                     "expect_column_values_to_be_in_set", "expect_column_pair_values_to_be_equal")
#: Expectations on the whole table, and the metric each compares with its bounds.
_TABLE_METRICS = ("expect_table_row_count_to_be_between", "expect_column_median_to_be_between",
                  "expect_column_mean_to_be_between")


@dataclass(frozen=True)
class SuiteBounds:
    """The thresholds of the suite, derived from the data config."""

    min_rows: int
    max_chars: int
    max_tokens: int
    max_truncated_fraction: float
    length_mostly: float = LENGTH_MOSTLY

    @classmethod
    def from_config(cls, cfg: DataConfig) -> SuiteBounds:
        """Row floor = ``min_rows``; character budget = ``max_length`` tokens x the chars-per-token ceiling."""
        return cls(min_rows=cfg.min_rows, max_chars=cfg.max_length * CHARS_PER_TOKEN_CEILING,
                   max_tokens=cfg.max_length, max_truncated_fraction=cfg.max_truncated_fraction)


@dataclass(frozen=True)
class FailedExpectation:
    """One failed expectation: what it checks, what was observed, the first offending source lines."""

    name: str
    observed: str
    lines: list[int]


@dataclass(frozen=True)
class GxOutcome:
    """What the GX step produced."""

    success: bool
    n_expectations: int
    failed: list[FailedExpectation]
    result_path: Path
    data_docs_dir: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "n_expectations": self.n_expectations,
                "failed_expectations": [asdict(failure) for failure in self.failed],
                "result_path": str(self.result_path),
                "data_docs_dir": str(self.data_docs_dir) if self.data_docs_dir else None}


def build_expectations(bounds: SuiteBounds, chat: bool, tokens: bool = False) -> list[Any]:
    """The expectations for the clean table (chat rows, or ``text`` rows when ``chat`` is False), plus
    those on the tokenized samples when the table has the token columns (``tokens``)."""
    import great_expectations.expectations as gxe

    from lora_pipeline.data.profile import CHAT_COLUMNS, TEXT_COLUMNS, TOKEN_COLUMNS

    columns = (CHAT_COLUMNS if chat else TEXT_COLUMNS) + (TOKEN_COLUMNS if tokens else ())
    suite: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=bounds.min_rows),
        gxe.ExpectTableColumnsToMatchSet(column_set=list(columns), exact_match=True),
        *(gxe.ExpectColumnValuesToNotBeNull(column=column) for column in columns),
        gxe.ExpectColumnValuesToBeUnique(column="content_hash"),
        gxe.ExpectColumnValuesToBeBetween(column="total_chars", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="total_chars", max_value=bounds.max_chars,
                                          mostly=bounds.length_mostly),
    ]
    if chat:
        suite += [
            gxe.ExpectColumnValuesToBeBetween(column="n_turns", min_value=MIN_TURNS),
            gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="answer_chars", min_value=1),
            gxe.ExpectColumnValuesToBeInSet(column="first_role", value_set=["system", "user"]),
            gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]),
            gxe.ExpectColumnValuesToBeInSet(column="roles_alternate", value_set=[True]),
            # A prompt longer than the whole budget leaves no room for the answer after truncation.
            gxe.ExpectColumnValuesToBeBetween(column="prompt_chars", max_value=bounds.max_chars,
                                              mostly=bounds.length_mostly),
        ]
    if tokens:
        suite += [
            # Independent of the cleaning code's own check: every row trains on something.
            gxe.ExpectColumnValuesToBeBetween(column="trainable_tokens", min_value=1),
            # Token-length distribution: the typical sample fits the budget...
            gxe.ExpectColumnMedianToBeBetween(column="tokens", min_value=1, max_value=bounds.max_tokens),
            # ...and few are cut (a cut answer loses its EOS).
            gxe.ExpectColumnMeanToBeBetween(column="truncated", min_value=0,
                                            max_value=bounds.max_truncated_fraction),
            # Every answer that fits the budget ends in a stop token (EOS or end-of-turn) whose label is kept.
            gxe.ExpectColumnPairValuesToBeEqual(column_A="trained_eos", column_B="answers_in_budget"),
        ]
    return suite


def _ephemeral_context(docs_dir: Path) -> Any:
    """An in-memory GX context whose only file output is a local Data Docs site at ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,  # no usage statistics
        progress_bars=ProgressBarsConfig(globally=False),  # keep pipeline logs readable
        data_docs_sites={
            "local_site": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _describe(result: Any) -> FailedExpectation:
    """A failed ExpectationValidationResult -> name, observation and offending source lines."""
    config = result.expectation_config
    args = ", ".join(f"{key}={config.kwargs[key]}" for key in ("column", "column_A", "column_B", "value_set",
                                                              "min_value", "max_value", "mostly")
                     if config.kwargs.get(key) is not None)
    details = result.to_json_dict().get("result") or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed = f"raised {result.exception_info.get('exception_message')}"
    elif "unexpected_count" in details:
        observed = f"{details['unexpected_count']} of {details.get('element_count')} rows unexpected"
    else:
        value = details.get("observed_value")
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain number
        observed = f"observed {value!r}"
    lines = [int(item[LINE_COLUMN]) for item in details.get("partial_unexpected_index_list") or []
             if isinstance(item, dict) and LINE_COLUMN in item]
    return FailedExpectation(f"{config.type}({args})", observed, lines)


class SuiteRun:
    """Validate the clean table chunk by chunk and aggregate into one GX result and one Data Docs page.

    Call :meth:`validate` with consecutive chunks of the table (in source order, at least one chunk, which
    may be empty), then :meth:`finish` with the whole table's statistics; :meth:`close` removes the
    spill file if the run is abandoned. Memory: one chunk (or one hash partition) at a time.

    Args:
        bounds: Suite thresholds.
        chat: Chat rows (True) or ``text`` rows (False).
        out_dir: Receives ``gx_validation_result.json`` and ``data_docs/``.
        tokens: The table has the token columns of the tokenized samples (checked too).
    """

    def __init__(self, bounds: SuiteBounds, chat: bool, out_dir: Path, tokens: bool = False) -> None:
        import great_expectations as gx

        self.out_dir = out_dir
        self.docs_dir = out_dir / DATA_DOCS_DIRNAME
        shutil.rmtree(self.docs_dir, ignore_errors=True)  # a re-run must not show the previous run's pages
        self.context = _ephemeral_context(self.docs_dir)
        asset = self.context.data_sources.add_pandas("clean_data").add_dataframe_asset("clean_rows")
        self._batches = asset.add_batch_definition_whole_dataframe("all_rows")
        self.suite = self.context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
        for expectation in build_expectations(bounds, chat, tokens):
            kind = expectation.expectation_type
            if kind not in _ROW_EXPECTATIONS + _TABLE_METRICS + ("expect_table_columns_to_match_set",
                                                                 "expect_column_values_to_be_unique"):
                raise ValueError(f"{kind} has no chunked aggregation in SuiteRun")
            self.suite.add_expectation(expectation)
        self.n_rows = 0
        self.n_chunks = 0
        self._order: list[str] = []  # expectation ids in GX's result order (from the first chunk)
        self._results: dict[str, Any] = {}  # id -> RowCounts, or the first chunk's result (table-level)
        self._last: Any = None  # the last chunk's suite result: the envelope (meta, batch id) of the aggregate
        self._spill_path = out_dir / _SPILL_FILENAME
        out_dir.mkdir(parents=True, exist_ok=True)
        self._spill = self._spill_path.open("wb")

    def validate(self, frame: Any) -> None:
        """Validate one chunk of the table (rows in source order, after the previous chunk's)."""
        import numpy as np

        suite_result = self._batches.get_batch(batch_parameters={"dataframe": frame}).validate(
            self.suite, result_format=RESULT_FORMAT)
        for result in suite_result.results:
            key = result.expectation_config.id
            kind = result.expectation_config.type
            if not self.n_chunks:
                self._order.append(key)
                self._results[key] = RowCounts(result) if kind in _ROW_EXPECTATIONS else result
            if kind in _ROW_EXPECTATIONS:
                self._results[key].add(result)
            elif kind == "expect_table_columns_to_match_set" and not result.success \
                    and self._results[key].success:
                self._results[key] = result  # the first failing chunk tells what is wrong
        self._last = suite_result
        self.n_chunks += 1
        self.n_rows += len(frame)
        if len(frame) and HASH_COLUMN in frame and LINE_COLUMN in frame:
            pairs = np.empty((len(frame), 2), dtype=np.int64)
            pairs[:, 0], pairs[:, 1] = frame[LINE_COLUMN].to_numpy(), frame[HASH_COLUMN].to_numpy()
            pairs.tofile(self._spill)

    def _unique(self, result: Any) -> Any:
        """``expect_column_values_to_be_unique`` over the whole table, validated by GX partition by partition.

        Rows are split by ``content_hash`` modulo the number of partitions, so all copies of a value are in
        one partition and each partition's unexpected rows are exactly its rows' share of the whole
        table's; partitions keep source order.
        """
        import numpy as np
        import pandas as pd

        self._spill.close()
        expectation = next(e for e in self.suite.expectations if e.id == result.expectation_config.id)
        partitions = max(1, math.ceil(self.n_rows / UNIQUE_PARTITION_ROWS))
        counts = RowCounts(result, ordered_by_line=False)
        for partition in range(partitions):
            lines, hashes = [], []
            with self._spill_path.open("rb") as spill:
                while len(block := np.fromfile(spill, dtype=np.int64, count=2 * _SPILL_BLOCK_ROWS)):
                    block = block.reshape(-1, 2)
                    mine = block[block[:, 1].view(np.uint64) % np.uint64(partitions) == partition]
                    lines.append(mine[:, 0])
                    hashes.append(mine[:, 1])
            table = pd.DataFrame({LINE_COLUMN: np.concatenate(lines) if lines else np.zeros(0, np.int64),
                                  HASH_COLUMN: np.concatenate(hashes) if hashes else np.zeros(0, np.int64)})
            counts.add(self._batches.get_batch(batch_parameters={"dataframe": table}).validate(
                expectation, result_format=RESULT_FORMAT))
            del lines, hashes, table
        return counts.finish()

    def finish(self, stats: Any) -> GxOutcome:
        """Aggregate the chunks, add the whole-table checks, save the result JSON and build Data Docs.

        Args:
            stats: The whole table's :class:`~lora_pipeline.data.profile.ColumnStats`.

        Returns:
            Success, failed expectations with their first offending source lines, and the output paths.
        """
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        if not self.n_chunks:
            raise ValueError("SuiteRun.finish before any chunk was validated")
        metrics = {"expect_table_row_count_to_be_between": self.n_rows,
                   "expect_column_median_to_be_between": lambda column: stats.median(column),
                   "expect_column_mean_to_be_between": lambda column: stats.truncated_mean()}
        results = []
        for key in self._order:
            entry = self._results[key]
            kind = entry.first.expectation_config.type if isinstance(entry, RowCounts) \
                else entry.expectation_config.type
            if isinstance(entry, RowCounts):
                results.append(entry.finish())
            elif kind == "expect_column_values_to_be_unique":
                results.append(self._unique(entry))
            elif kind in _TABLE_METRICS:
                kwargs = entry.expectation_config.kwargs
                metric = metrics[kind]
                value = metric(kwargs.get("column")) if callable(metric) else metric
                entry.success, entry.result = between(value, kwargs), {"observed_value": value}
                entry.exception_info = {"raised_exception": False, "exception_traceback": None,
                                        "exception_message": None}
                results.append(entry)
            else:  # the column set: the same in every chunk
                results.append(entry)
        self.close()
        suite_result = self._last
        successful = sum(bool(result.success) for result in results)
        suite_result.results = results
        suite_result.success = successful == len(results)
        suite_result.statistics = {"evaluated_expectations": len(results), "successful_expectations": successful,
                                   "unsuccessful_expectations": len(results) - successful,
                                   "success_percent": successful / len(results) * 100 if results else None}
        run_id = RunIdentifier(run_time=datetime.now(timezone.utc))
        suite_result.meta.update({"run_id": run_id, "validation_time": run_id.run_time,
                                  "batch_parameters": {"dataframe": "<DATAFRAME>"},
                                  "chunks": {"n_rows": self.n_rows, "n_chunks": self.n_chunks,
                                             "unique_partitions": max(1, math.ceil(
                                                 self.n_rows / UNIQUE_PARTITION_ROWS))}})
        result_path = self.out_dir / RESULT_FILENAME
        result_path.write_text(json.dumps(suite_result.to_json_dict(), indent=2, default=str))
        key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=SUITE_NAME),
                                         run_id=run_id, batch_identifier=suite_result.batch_id)
        self.context.validation_results_store.store_validation_results(suite_result, key)
        self.context.build_data_docs(resource_identifiers=[key, ExpectationSuiteIdentifier(name=SUITE_NAME)])
        failed = [_describe(result) for result in results if not result.success]
        return GxOutcome(
            success=bool(suite_result.success),
            n_expectations=len(results),
            failed=failed,
            result_path=result_path,
            data_docs_dir=self.docs_dir if (self.docs_dir / "index.html").is_file() else None,
        )

    def close(self) -> None:
        """Remove the spill file (idempotent)."""
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)


def run_suite(table: Any, bounds: SuiteBounds, chat: bool, out_dir: Path, tokens: bool = False,
              chunk_rows: int | None = None) -> GxOutcome:
    """Validate a whole derived-column ``table`` as the data stage does (in chunks of ``chunk_rows``).

    Args:
        table: The derived-column DataFrame (see :class:`lora_pipeline.data.profile.Profile`).
        bounds: Suite thresholds.
        chat: Chat rows (True) or ``text`` rows (False).
        out_dir: Receives ``gx_validation_result.json`` and ``data_docs/``.
        tokens: The table has the token columns of the tokenized samples (checked too).
        chunk_rows: Rows per GX chunk (default: the profile's chunk size).

    Returns:
        Success, failed expectations with their first offending source lines, and the output paths.
    """
    from lora_pipeline.data.profile import CHUNK_ROWS, ColumnStats

    step = chunk_rows or CHUNK_ROWS
    stats = ColumnStats(tuple(table.columns))
    run = SuiteRun(bounds, chat, out_dir, tokens)
    try:
        for start in range(0, max(len(table), 1), step):
            chunk = table.iloc[start:start + step]
            stats.update({name: chunk[name].to_numpy() for name in table.columns})
            run.validate(chunk.reset_index(drop=True))
        return run.finish(stats)
    finally:
        run.close()
