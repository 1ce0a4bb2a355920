"""The derived-column table GX validates: one small numeric record per clean row, no text.

Rows are buffered as int64 records (15 numbers at most) and handed on in fixed-size chunks (``chunk_rows``,
about 12 MB of buffer) to the GX step, which validates every chunk; then the buffer is emptied. What is
kept across chunks is :class:`ColumnStats`: exact whole-table statistics (row count, sums, and a histogram
of each length column) whose size depends on how many distinct lengths there are, not on the number of
rows. So profiling 5 million clean rows costs what profiling one chunk does, while the texts stream
straight to ``clean.jsonl`` and the GX step still sees every clean row.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from lora_pipeline.data.cleaning import roles_alternate

#: Role codes stored per row; decoded to strings (pandas categoricals) for GX and Data Docs.
ROLE_NAMES = ("system", "user", "assistant", "other")
_ROLE_CODES = {name: code for code, name in enumerate(ROLE_NAMES)}
_OTHER = _ROLE_CODES["other"]
CHAT_COLUMNS = ("line", "n_turns", "prompt_chars", "answer_chars", "total_chars", "min_turn_chars",
                "first_role", "last_role", "roles_alternate", "content_hash")
TEXT_COLUMNS = ("line", "total_chars", "content_hash")
#: Added when the stage has a tokenizer: the templated, truncated training sample of each row.
TOKEN_COLUMNS = ("tokens", "trainable_tokens", "truncated", "answers_in_budget", "trained_eos")
#: Columns that are flags or identifiers, not lengths (left out of the length statistics).
_NOT_LENGTHS = ("line", "content_hash", "first_role", "last_role", "roles_alternate", "truncated",
                "answers_in_budget", "trained_eos")
#: Percentiles reported for each length column in report.json.
PERCENTILES = (50, 95)
#: Clean rows per chunk handed to GX (the GX step's memory is that of one chunk).
CHUNK_ROWS = 100_000
#: Column types (every other column is int32).
_DTYPES = {"line": np.int64, "content_hash": np.int64, "first_role": np.int8, "last_role": np.int8,
           "roles_alternate": np.int8, "truncated": np.int8}


def _role_code(role: str) -> int:
    return _ROLE_CODES.get(role, _OTHER)


def _numpy_percentile(lower: Any, upper: Any, n: int, q: float) -> float:
    """``numpy.percentile(values, q)`` (linear method) of ``n`` values whose order statistics at
    ``floor((n - 1) * q / 100)`` and the next one are ``lower`` and ``upper`` (numpy scalars of the
    column's dtype): numpy's own arithmetic, so the result is the same float."""
    virtual = (n - 1) * np.true_divide(q, 100)
    gamma = virtual - np.floor(virtual)
    diff = upper - lower
    value = lower + diff * gamma
    if gamma >= 0.5:
        value = upper - diff * (1 - gamma)
    return float(value)


class ColumnStats:
    """Exact statistics of the profile columns over every row seen, in memory independent of the row count.

    Each length column is kept as a histogram (distinct value -> count), from which min, max, mean,
    any order statistic, numpy's percentiles and pandas' median are recovered exactly.
    """

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.n_rows = 0
        self.lengths = tuple(name for name in columns if name not in _NOT_LENGTHS)
        self._dtypes: dict[str, np.dtype] = {}
        self._values = {name: np.zeros(0, dtype=np.int64) for name in self.lengths}
        self._counts = {name: np.zeros(0, dtype=np.int64) for name in self.lengths}
        self.n_truncated = 0 if "truncated" in columns else None

    def update(self, columns: dict[str, np.ndarray]) -> None:
        """Fold one chunk of rows in (``columns``: name -> values of the chunk, equal lengths)."""
        n = len(columns["line"])
        if not n:
            return
        self.n_rows += n
        for name in self.lengths:
            values = columns[name]
            self._dtypes.setdefault(name, values.dtype)
            merged, counts = np.unique(values, return_counts=True)
            if len(self._values[name]):
                every = np.concatenate((self._values[name], merged.astype(np.int64)))
                merged, inverse = np.unique(every, return_inverse=True)
                summed = np.zeros(len(merged), dtype=np.int64)
                np.add.at(summed, inverse, np.concatenate((self._counts[name], counts)))
                counts = summed
            self._values[name], self._counts[name] = merged.astype(np.int64), counts.astype(np.int64)
        if self.n_truncated is not None:
            self.n_truncated += int(np.count_nonzero(columns["truncated"]))

    def sum(self, name: str) -> int:
        return int(np.dot(self._values[name], self._counts[name]))

    def order_statistic(self, name: str, k: int) -> Any:
        """The ``k``-th smallest value (0-based) of a length column, as a numpy scalar of its dtype."""
        position = int(np.searchsorted(np.cumsum(self._counts[name]), k, side="right"))
        return self._dtypes[name].type(self._values[name][position])

    def percentile(self, name: str, q: float) -> float:
        """What ``numpy.percentile(column, q)`` returns for the whole column."""
        lower = math.floor((self.n_rows - 1) * np.true_divide(q, 100))
        return _numpy_percentile(self.order_statistic(name, lower),
                                 self.order_statistic(name, min(lower + 1, self.n_rows - 1)), self.n_rows, q)

    def median(self, name: str) -> float | None:
        """What pandas' ``Series.median()`` returns for the whole column (None without rows)."""
        if not self.n_rows:
            return None
        middle = self.n_rows // 2
        if self.n_rows % 2:
            return float(self.order_statistic(name, middle))
        return (float(self.order_statistic(name, middle - 1)) + float(self.order_statistic(name, middle))) / 2

    def truncated_mean(self) -> float | None:
        """The mean of the ``truncated`` flag (None without rows or without token columns)."""
        if not self.n_rows or self.n_truncated is None:
            return None
        return self.n_truncated / self.n_rows

    def length_stats(self) -> dict[str, dict[str, float]]:
        """min / mean / percentiles / max of each length column (empty dict when there are no rows)."""
        if not self.n_rows:
            return {}
        return {name: {
            "min": int(self._values[name][0]),
            "mean": round(self.sum(name) / self.n_rows, 2),
            **{f"p{q}": self.percentile(name, q) for q in PERCENTILES},
            "max": int(self._values[name][-1]),
        } for name in self.lengths}

    def token_summary(self) -> dict[str, float]:
        """Truncation and trainable-token totals ({} without token columns or rows)."""
        if self.n_truncated is None or not self.n_rows:
            return {}
        return {"n_truncated": self.n_truncated, "truncated_fraction": round(self.n_truncated / self.n_rows, 6),
                "templated_tokens": self.sum("tokens"), "trainable_tokens": self.sum("trainable_tokens")}


class Profile:
    """Accumulates the derived columns of the clean rows, in the order they were written.

    With ``on_chunk``, every ``chunk_rows`` rows the buffered table is passed on as a DataFrame (GX
    validates it) and dropped; :meth:`flush` passes on the rest. Statistics cover every row added.
    Without it, the whole table stays buffered (:meth:`to_frame`), as small tests and tools need.
    """

    def __init__(self, chat: bool, tokens: bool = False, *, chunk_rows: int | None = None,
                 on_chunk: Callable[[Any], None] | None = None) -> None:
        self.chat = chat
        self.tokens = tokens
        self.columns = (CHAT_COLUMNS if chat else TEXT_COLUMNS) + (TOKEN_COLUMNS if tokens else ())
        self.stats = ColumnStats(self.columns)
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.on_chunk = on_chunk
        self.n_chunks = 0  # chunks passed on so far
        self._passed = 0  # rows passed on (and dropped) so far
        self._folded = 0  # buffered rows already counted in ``stats``
        self._new_buffer()

    def _new_buffer(self) -> None:
        self._buffer = array("q")  # the buffered rows, row after row (one extend per row: cheaper than a column each)

    @property
    def _buffered(self) -> int:
        return len(self._buffer) // len(self.columns)

    def __len__(self) -> int:
        return self._passed + self._buffered

    def add(self, line: int, row: dict[str, Any], content_hash: int, sample: Any = None) -> None:
        """Record one clean row (``line``: its source line/row number; ``content_hash``: its fingerprint;
        ``sample``: its training sample (a :class:`~lora_pipeline.formatting.TokenizedSample` or anything
        with the same counts), required when the profile has token columns)."""
        if self.tokens and sample is None:
            raise ValueError("a profile with token columns needs each row's sample")
        if self.chat:
            messages = row["messages"]
            lengths = [len(message["content"]) for message in messages]
            roles = [message["role"] for message in messages]
            total = sum(lengths)
            # "prompt" = everything the final answer is conditioned on; "answer" = all assistant turns.
            values: list[int] = [
                line, len(messages), total - lengths[-1] if lengths else 0,
                sum(n for n, role in zip(lengths, roles, strict=True) if role == "assistant"),
                total, min(lengths, default=0),
                _role_code(roles[0]) if roles else _OTHER, _role_code(roles[-1]) if roles else _OTHER,
                int(roles_alternate(roles)), content_hash,
            ]
        else:
            values = [line, len(row["text"]), content_hash]
        if self.tokens:
            values += [sample.full_length, sample.n_trainable, int(sample.truncated), sample.answers_in_budget,
                       sample.trained_stops]
        if len(values) != len(self.columns):
            raise ValueError(f"{len(values)} values for {len(self.columns)} columns")
        self._buffer.extend(values)
        if self.on_chunk is not None and self._buffered >= self.chunk_rows:
            self.flush()

    def _arrays(self, start: int = 0) -> dict[str, np.ndarray]:
        """The buffered rows from ``start`` on, column by column, in each column's type (int8/int32/int64)."""
        table = np.frombuffer(self._buffer, dtype=np.int64).reshape(-1, len(self.columns))[start:]
        return {name: table[:, j].astype(_DTYPES.get(name, np.int32)) for j, name in enumerate(self.columns)}

    def _fold(self) -> None:
        """Count the buffered rows not yet in ``stats``."""
        if self._folded < self._buffered:
            self.stats.update(self._arrays(self._folded))
            self._folded = self._buffered

    def flush(self) -> None:
        """Pass the buffered rows on to ``on_chunk`` and drop them. The first flush always passes a table on,
        even an empty one, so GX sees a table whatever the row count."""
        buffered = self._buffered
        if self.on_chunk is None or (not buffered and self.n_chunks):
            return
        self._fold()
        frame = self.to_frame()
        self._passed += buffered
        self._folded = 0
        self._new_buffer()
        self.n_chunks += 1
        self.on_chunk(frame)

    def to_frame(self) -> Any:
        """The buffered rows as a pandas DataFrame (roles as strings, roles_alternate as bool)."""
        import pandas as pd

        frame: dict[str, Any] = {}
        for name, values in self._arrays().items():
            if name in ("first_role", "last_role"):
                frame[name] = pd.Categorical.from_codes(values.astype(np.int8), categories=list(ROLE_NAMES))
            elif name in ("roles_alternate", "truncated"):
                frame[name] = values.astype(bool)
            else:  # int64: GX checks bounds on int64 columns vectorised, on int32 ones one value at a time
                frame[name] = values.astype(np.int64)
        return pd.DataFrame(frame, columns=list(self.columns))

    def token_summary(self) -> dict[str, float]:
        """Truncation and trainable-token totals over every row added ({} without token columns or rows)."""
        self._fold()
        return self.stats.token_summary()

    def length_stats(self) -> dict[str, dict[str, float]]:
        """min / mean / percentiles / max of each length column over every row added ({} without rows)."""
        self._fold()
        return self.stats.length_stats()
