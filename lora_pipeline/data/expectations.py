"""Great Expectations (1.x) suite over the derived-column table of the clean rows.

The cleaning rules already quarantine bad rows; this suite independently checks the contract of what
was written (roles, non-empty turns, uniqueness, row count, length distribution), so a regression in
the cleaning code, or data that is clean row by row but wrong as a whole (too few rows, lengths far
beyond the token budget), still stops the run. Results and Data Docs are written under ``out_dir``
through an ephemeral context: nothing goes to the working directory or a ``gx/`` project folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.config import DataConfig

#: Generous ceiling on characters per token (BPE tokenizers average ~4 on English prose).
CHARS_PER_TOKEN_CEILING = 8
#: Share of rows that must fit the character budget; the rest are merely truncated by the format stage.
LENGTH_MOSTLY = 0.9
#: Smallest chat sample: one user turn and one assistant turn.
MIN_TURNS = 2
#: Offending rows GX returns per failed expectation (only the first few reach the failure messages).
PARTIAL_UNEXPECTED_ROWS = 20
SUITE_NAME = "clean_rows"
RESULT_FILENAME = "gx_validation_result.json"
DATA_DOCS_DIRNAME = "data_docs"
LINE_COLUMN = "line"


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


def run_suite(table: Any, bounds: SuiteBounds, chat: bool, out_dir: Path, tokens: bool = False) -> GxOutcome:
    """Validate ``table`` with a GX checkpoint; save the result JSON and build Data Docs in ``out_dir``.

    Args:
        table: The derived-column DataFrame (see :class:`lora_pipeline.data.profile.Profile`).
        bounds: Suite thresholds.
        chat: Chat rows (True) or ``text`` rows (False).
        tokens: The table has the token columns of the tokenized samples (checked too).
        out_dir: Receives ``gx_validation_result.json`` and ``data_docs/``.

    Returns:
        Success, failed expectations with their first offending source lines, and the output paths.
    """
    import great_expectations as gx
    from great_expectations.checkpoint import Checkpoint, UpdateDataDocsAction

    docs_dir = out_dir / DATA_DOCS_DIRNAME
    shutil.rmtree(docs_dir, ignore_errors=True)  # a re-run must not show the previous run's pages
    context = _ephemeral_context(docs_dir)
    batch = context.data_sources.add_pandas("clean_data").add_dataframe_asset("clean_rows")
    batch_definition = batch.add_batch_definition_whole_dataframe("all_rows")
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for expectation in build_expectations(bounds, chat, tokens):
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="clean_rows_validation", data=batch_definition, suite=suite))
    checkpoint = context.checkpoints.add(Checkpoint(
        name="data_stage",
        validation_definitions=[validation],
        actions=[UpdateDataDocsAction(name="update_data_docs")],
        # SUMMARY + the line column: each failure names source lines, without GX listing every row.
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [LINE_COLUMN],
                       "partial_unexpected_count": PARTIAL_UNEXPECTED_ROWS},
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": table})
    (suite_result,) = outcome.run_results.values()
    result_path = out_dir / RESULT_FILENAME
    result_path.write_text(json.dumps(suite_result.to_json_dict(), indent=2, default=str))
    failed = [_describe(result) for result in suite_result.results if not result.success]
    return GxOutcome(
        success=bool(suite_result.success),
        n_expectations=len(suite_result.results),
        failed=failed,
        result_path=result_path,
        data_docs_dir=docs_dir if (docs_dir / "index.html").is_file() else None,
    )
