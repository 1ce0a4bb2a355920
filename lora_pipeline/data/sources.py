"""Readers: turn any supported source into a stream of raw rows with their source position.

Every reader is a generator, so a large file is never held in memory by this module: JSONL is read
line by line, CSV in pandas chunks, Parquet in pyarrow record batches, and Hugging Face datasets are
memory-mapped Arrow (or streamed). Only a ``.json`` file (one JSON document) is parsed whole.
Heavy libraries are imported where they are used so that reading a JSONL eval set stays cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lora_pipeline.config import BUILTIN_DEMO
from lora_pipeline.data.reasons import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
#: Suffixes that mark a string as a file path rather than a hub dataset id. A bare "any suffix" rule
#: would misread real hub ids such as "teknium/OpenHermes-2.5".
FILE_LIKE_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES + (
    ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip",
)
#: Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` always write.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
#: CSV cells holding a JSON-encoded list (a CSV cannot nest), decoded before normalisation.
CSV_JSON_COLUMNS = ("messages", "conversations", "prompt", "completion")
CSV_CHUNK_ROWS = 10_000
PARQUET_BATCH_ROWS = 10_000


class SourceRow(NamedTuple):
    """One raw row and where it came from (a named tuple: one is made per row, twice as fast as a dataclass).

    Attributes:
        line: 1-based physical line for JSONL; 1-based row index for every other source.
        record: The parsed row (normally a dict) or, when ``unparseable``, the raw line text.
        unparseable: The line could not be decoded as UTF-8 JSON.
    """

    line: int
    record: Any
    unparseable: bool = False


@dataclass(frozen=True)
class DataSource:
    """A resolved source: what it is, how to name it in messages, and how to read it."""

    name: str
    kind: str  # jsonl | json | csv | parquet | saved_dataset | data_dir | hub
    path: Path | None = None

    @property
    def unit(self) -> str:
        """What :attr:`SourceRow.line` counts in this source, for messages ("line" or "row")."""
        return "line" if self.kind == "jsonl" else "row"

    def rows(self) -> Iterator[SourceRow]:
        """Yield the rows in source order (JSONL blank lines are separators, not rows)."""
        reader = _READERS[self.kind]
        return reader(self)


def looks_like_path(source: str) -> bool:
    """True when ``source`` is meant as a local path (so "not found" is an error, not a hub lookup).

    Hub ids are ``name`` or ``namespace/name``; anything starting with ``/ . ~``, holding a backslash
    or several slashes, or ending in a data-file suffix is a path.
    """
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in FILE_LIKE_SUFFIXES
    )


def resolve_source(source: str | Path) -> DataSource:
    """Decide how to read ``source``: a local file by suffix, a dataset directory, or a hub id.

    Args:
        source: Local file/directory path or Hugging Face hub dataset id.

    Returns:
        The resolved :class:`DataSource` (nothing is read yet).

    Raises:
        DataError: ``builtin:demo`` was not resolved, a path-like source does not exist, or a file
            has an unsupported suffix.
    """
    text = str(source)
    if text == BUILTIN_DEMO:
        raise DataError(f"data source {BUILTIN_DEMO!r} must be resolved to the demo world's files first")
    path = Path(text).expanduser()
    if path.is_dir():
        saved = any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)
        return DataSource(str(path), "saved_dataset" if saved else "data_dir", path)
    if path.is_file():
        suffix = path.suffix.lower()
        for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("json", JSON_SUFFIXES),
                               ("csv", CSV_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
            if suffix in suffixes:
                return DataSource(str(path), kind, path)
        raise DataError(f"{path}: unsupported data file suffix {suffix!r}; use .jsonl, .json, .csv, .parquet "
                        "or a datasets directory")
    if isinstance(source, Path) or looks_like_path(text):
        raise DataError(f"data file not found: {path}")
    return DataSource(text, "hub")


#: A JSONL line longer than this is not read into memory: it is quarantined as unparseable, by line number.
MAX_ROW_BYTES = 16 << 20


def _lines(handle: Any, limit: int) -> Iterator[bytes | None]:
    """The file's lines, each read with at most ``limit`` bytes in memory; None for a longer line (skipped)."""
    while raw := handle.readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _read_jsonl(src: DataSource) -> Iterator[SourceRow]:
    # Binary mode: a line with invalid UTF-8 becomes one unparseable row instead of aborting the read.
    with src.path.open("rb") as handle:  # type: ignore[union-attr]
        for line_no, raw in enumerate(_lines(handle, MAX_ROW_BYTES), start=1):
            if raw is None:
                yield SourceRow(line_no, f"<line of more than {MAX_ROW_BYTES} bytes, not read: see line {line_no} "
                                f"of {src.name}>", unparseable=True)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield SourceRow(line_no, raw.decode("utf-8", "replace").rstrip("\r\n"), unparseable=True)
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # editors on Windows like to add a BOM
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
                yield SourceRow(line_no, text.rstrip("\r\n"), unparseable=True)
                continue
            if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(record):
                yield SourceRow(line_no, text.rstrip("\r\n"), unparseable=True)
                continue
            yield SourceRow(line_no, record)


#: A JSON escape of a UTF-16 surrogate: only such an escape can put one into a parsed string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _holds_lone_surrogate(record: Any) -> bool:
    """Whether a parsed row holds a lone surrogate (``"\\ud800"`` is valid JSON, but no UTF-8 text can hold
    it: it would fail every later step that writes or tokenizes the row). A surrogate pair escaped as two
    ``\\u`` escapes is decoded by ``json.loads`` into one ordinary character."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_json(src: DataSource) -> Iterator[SourceRow]:
    try:
        text = src.path.read_text(encoding="utf-8-sig")  # type: ignore[union-attr]
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Several documents: JSON Lines saved with a .json name (common). Read it as JSONL; its
            # numbers are then physical lines, equal to row numbers unless the file has blank lines.
            yield from _read_jsonl(DataSource(src.name, "jsonl", src.path))
            return
        raise DataError(f"{src.name}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{src.name}: not valid UTF-8 ({exc})") from exc
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{src.name}: a .json data file must hold a list of rows or {{\"data\": [...]}}")
    escapes = _SURROGATE_ESCAPE.search(text)
    for index, record in enumerate(document, start=1):
        if escapes and _holds_lone_surrogate(record):
            yield SourceRow(index, json.dumps(record), unparseable=True)  # ASCII: the escape kept as written
            continue
        yield SourceRow(index, record)


def _decode_csv_cell(value: str) -> Any:
    stripped = value.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass  # left as text: the normaliser reports wrong_type with the row
    return value


def _read_csv(src: DataSource) -> Iterator[SourceRow]:
    import pandas as pd

    # dtype=str and no NA parsing: "" stays "", "None"/"NA" stay text; nothing is guessed.
    try:
        chunks = pd.read_csv(src.path, dtype=str, keep_default_na=False, chunksize=CSV_CHUNK_ROWS)
        index = 0
        for chunk in chunks:
            for record in chunk.to_dict(orient="records"):
                index += 1
                escaped = False
                for column in CSV_JSON_COLUMNS:
                    if isinstance(record.get(column), str):
                        escaped = escaped or bool(_SURROGATE_ESCAPE.search(record[column]))
                        record[column] = _decode_csv_cell(record[column])
                if escaped and _holds_lone_surrogate(record):
                    yield SourceRow(index, json.dumps(record), unparseable=True)
                    continue
                yield SourceRow(index, record)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{src.name}: cannot parse CSV: {exc}") from exc


def _read_parquet(src: DataSource) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(src.path)
    except pa.ArrowException as exc:
        raise DataError(f"{src.name}: cannot read Parquet: {exc}") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            index += 1
            yield SourceRow(index, record)


def _read_saved_dataset(src: DataSource) -> Iterator[SourceRow]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(src.path))
    if isinstance(dataset, DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise DataError(f"{src.name}: saved DatasetDict has no 'train' split (splits: {sorted(dataset)})")
    for index, record in enumerate(dataset, start=1):
        yield SourceRow(index, record)


def _read_with_load_dataset(src: DataSource) -> Iterator[SourceRow]:
    from datasets import load_dataset

    try:
        if src.kind == "data_dir":
            # Streaming: a folder of data files is read in place, not copied into the HF cache.
            dataset = load_dataset(str(src.path), split="train", streaming=True)
        else:
            dataset = load_dataset(src.name, split="train")
        for index, record in enumerate(dataset, start=1):
            yield SourceRow(index, record)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        what = "data directory" if src.kind == "data_dir" else "hub dataset"
        raise DataError(f"cannot load {what} {src.name!r} with datasets.load_dataset: {exc}") from exc


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "saved_dataset": _read_saved_dataset,
    "data_dir": _read_with_load_dataset,
    "hub": _read_with_load_dataset,
}
