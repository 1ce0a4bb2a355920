"""Adding up Great Expectations results over chunks of one table, as one GX run over all of it would report.

:class:`lora_pipeline.data.expectations.SuiteRun` validates the clean rows chunk by chunk (and ``content_hash``
uniqueness partition by partition); these helpers sum each row-by-row expectation's counts with GX's own
formulas and keys, and judge a whole-table aggregate against an expectation's bounds.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

#: Offending rows GX returns per failed expectation (only the first few reach the failure messages).
PARTIAL_UNEXPECTED_ROWS = 20
#: The table column that identifies a row by its source line.
LINE_COLUMN = "line"


class RowCounts:
    """One row-by-row expectation's result, summed over chunks (or partitions)."""

    def __init__(self, result: Any, ordered_by_line: bool = True) -> None:
        self.first = result  # the first chunk's ExpectationValidationResult (its config and result keys)
        self.ordered_by_line = ordered_by_line
        self.element_count = 0
        self.unexpected_count = 0
        self.missing_count: int | None = 0 if "missing_count" in (result.result or {}) else None
        self.unexpected: list[tuple[Any, Any]] = []  # (index entry, value) of the first offending rows
        self.exception: Any = None

    def add(self, result: Any) -> None:
        if result.exception_info and result.exception_info.get("raised_exception"):
            self.exception = self.exception or result
            return
        details = result.result or {}
        self.element_count += details.get("element_count") or 0
        self.unexpected_count += details.get("unexpected_count") or 0
        if self.missing_count is not None:
            self.missing_count += details.get("missing_count") or 0
        pairs = list(zip(details.get("partial_unexpected_index_list") or [],
                         details.get("partial_unexpected_list") or [], strict=False))
        if self.ordered_by_line:
            if len(self.unexpected) < PARTIAL_UNEXPECTED_ROWS:
                self.unexpected += pairs[: PARTIAL_UNEXPECTED_ROWS - len(self.unexpected)]
        else:  # partitions: keep the first offending rows by source line
            self.unexpected = sorted(self.unexpected + pairs, key=lambda pair: pair[0][LINE_COLUMN])
            del self.unexpected[PARTIAL_UNEXPECTED_ROWS:]

    def finish(self) -> Any:
        """The result a single GX run over all the rows gives (GX's own formulas and keys, SUMMARY format)."""
        result = self.first
        if self.exception is not None:
            result.success, result.result, result.exception_info = False, {}, self.exception.exception_info
            return result
        kwargs = result.expectation_config.kwargs
        mostly = kwargs.get("mostly") if kwargs.get("mostly") is not None else 1.0
        total, unexpected = self.element_count, self.unexpected_count
        nonnull = None if self.missing_count is None else total - self.missing_count
        if self.missing_count is None:  # expect_column_values_to_not_be_null: nulls are what it counts
            success = total == 0 or (total - unexpected) / total >= mostly
        else:
            success = total == 0 or nonnull == 0 or (float(nonnull) - float(unexpected)) / float(nonnull) >= mostly
        values = [value for _, value in self.unexpected]
        details: dict[str, Any] = {"element_count": total, "unexpected_count": unexpected}
        percent_total = unexpected / total * 100 if total > 0 else None
        if nonnull is None:
            details["unexpected_percent"] = percent_total
        else:
            details["unexpected_percent"] = (unexpected / nonnull * 100 if nonnull > 0 else None) if total > 0 else None
        details["partial_unexpected_list"] = values
        details["unexpected_index_column_names"] = [LINE_COLUMN]
        if nonnull is not None:
            details["missing_count"] = self.missing_count
            details["missing_percent"] = self.missing_count / total * 100 if total > 0 else None
            details["unexpected_percent_total"] = percent_total
            details["unexpected_percent_nonmissing"] = details["unexpected_percent"]
        hashable = [tuple(value.values()) if isinstance(value, dict) else value for value in values]
        try:
            details["partial_unexpected_counts"] = [
                {"value": value, "count": count} for value, count in sorted(
                    Counter(hashable).most_common(PARTIAL_UNEXPECTED_ROWS), key=lambda item: (-item[1], item[0]))]
        except TypeError:
            pass  # what GX does with unhashable values: no counts
        details["partial_unexpected_index_list"] = [entry for entry, _ in self.unexpected]
        result.success, result.result = bool(success), details
        return result


def between(value: Any, kwargs: dict[str, Any]) -> bool:
    """``min_value <= value <= max_value`` as the *_to_be_between expectations judge an observed value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    low_ok = low is None or (value > low if kwargs.get("strict_min") else value >= low)
    high_ok = high is None or (value < high if kwargs.get("strict_max") else value <= high)
    return bool(low_ok and high_ok)
