"""Failure rules and the JSON report of the data stage."""

from __future__ import annotations

from typing import Any

from lora_pipeline.config import DataConfig
from lora_pipeline.data.expectations import GxOutcome, SuiteBounds
from lora_pipeline.data.reasons import REASONS
from lora_pipeline.data.sources import DataSource
from lora_pipeline.data.writer import Tally

#: Offending lines quoted in one failure message.
LINES_IN_MESSAGE = 5


def _lines(unit: str, lines: list[int]) -> str:
    """"; first lines 3, 7, ..." ("" when there are none, e.g. for a table-level expectation)."""
    if not lines:
        return ""
    more = ", ..." if len(lines) > LINES_IN_MESSAGE else ""
    return f"; first {unit}s " + ", ".join(map(str, lines[:LINES_IN_MESSAGE])) + more


def reject_fraction(tally: Tally) -> float:
    """Quarantined share of the input rows (0.0 for an empty source)."""
    return tally.n_quarantined / tally.n_input if tally.n_input else 0.0


def failure_messages(cfg: DataConfig, src: DataSource, tally: Tally, gx: GxOutcome,
                     held_out_fraction: float | None = None) -> list[str]:
    """Human-readable failures: reject fraction, row floor, and each failed GX expectation.

    Each message names the rule, the source and its first offending lines/rows.
    """
    failures = []
    fraction = reject_fraction(tally)
    if fraction > cfg.max_reject_fraction:
        by_reason = ", ".join(f"{code}: {count}" for code, count in tally.reason_counts.most_common())
        failures.append(
            f"reject fraction {fraction:.3f} > data.max_reject_fraction {cfg.max_reject_fraction}: "
            f"{tally.n_quarantined} of {tally.n_input} rows of {src.name} quarantined ({by_reason})"
            f"{_lines(src.unit, tally.quarantined_lines)}"
        )
    if tally.n_clean < cfg.min_rows:
        failures.append(
            f"only {tally.n_clean} clean rows < data.min_rows {cfg.min_rows} in {src.name} "
            f"({tally.n_quarantined} of {tally.n_input} quarantined{_lines(src.unit, tally.quarantined_lines)})"
        )
    if held_out_fraction and tally.n_held_out == 0 and tally.n_clean:
        failures.append(
            f"no row of {src.name} was held out for evaluation (data.eval_fraction {held_out_fraction} of "
            f"{tally.n_clean} clean rows): raise data.eval_fraction or set data.eval_path")
    for failed in gx.failed:
        failures.append(f"GX expectation {failed.name} failed on the clean rows of {src.name}: "
                        f"{failed.observed}{_lines(src.unit, failed.lines)}")
    return failures


def build_report(cfg: DataConfig, src: DataSource, tally: Tally, gx: GxOutcome, bounds: SuiteBounds,
                 *, failures: list[str], success: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """The content of ``report.json`` (everything a reviewer needs without opening the JSONL files)."""
    return {
        "success": success,
        "failures": failures,
        "source": src.name,
        "source_kind": src.kind,
        "line_unit": src.unit,
        "format": cfg.format,
        "n_input": tally.n_input,
        "n_clean": tally.n_clean,
        "n_quarantined": tally.n_quarantined,
        "n_held_out": tally.n_held_out,
        "reject_fraction": round(reject_fraction(tally), 6),
        "reason_counts": dict(sorted(tally.reason_counts.items())),
        "first_lines_by_reason": tally.first_lines,
        "reasons": REASONS,
        "thresholds": {"min_rows": cfg.min_rows, "max_reject_fraction": cfg.max_reject_fraction,
                       "max_chars": bounds.max_chars, "length_mostly": bounds.length_mostly,
                       "max_tokens": bounds.max_tokens, "max_truncated_fraction": bounds.max_truncated_fraction},
        "length_stats": tally.profile.length_stats(),
        "token_stats": tally.profile.token_summary(),
        "data_hash": tally.data_hash,
        "gx": gx.to_dict(),
        **extra,
    }
