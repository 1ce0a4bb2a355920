"""Stage records: a re-run with identical inputs takes a stage's outputs from an earlier run, by content.

A stage that computes (validate, format, train, evaluate, merge) keys its work by the *content* of what
it reads: input files by their SHA-256, the base by its weights' fingerprint and its other files (the
tokenizer), the config sections it uses, the pipeline's own source and the library versions. After it
ran, its outputs (files under the run directory) and its small result dict are kept in a record under
``<output_dir>/cache/stages/<stage>/<key>/``; a later run whose key is the same gets them back, linked
into its own run directory, instead of computing them again. Anything that differs gives another key:
the stage runs. Paths never enter a key (a new run has a new directory), so moving the data or the
output tree elsewhere with the same bytes still reuses.

Safety: a record is published atomically (staging directory, then rename) and lists every file with its
size and SHA-256; each reuse checks them all first, and a record with a missing or changed file is
never used (the stage runs again and replaces it). Files are hard links where the file system allows:
a record costs no extra space, and deleting a run directory leaves the records it filled intact. As a
record shares its files with run directories, outputs are never edited in place (no stage does; a file
changed anyway fails the check). ``rm -rf <output_dir>/cache/stages`` forgets every record: the next run
of each stage computes again.

Prefect's task cache is not used for this: a cache hit returns a value without running any code, so it
could neither check that the files behind the value are still intact nor put them in the new run's
directory. Prefect still caches every stage *within* a flow run, so a retry of the flow run takes them
from there (see ``tasks/policy.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lora_pipeline.base_model import file_sha256

logger = logging.getLogger(__name__)

#: Key of a stage result that says where it came from: ``{"compute_seconds", "reused_from"}``.
EXECUTION = "execution"
RECORD_FILENAME = "record.json"
_RUN_DIR = "{run_dir}"
#: Libraries whose version can change what a stage computes (data checks, tokenization, training, scoring).
_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers",
              "great_expectations", "rouge_score")
#: Files of a model directory that are its weights (identified by the base fingerprint instead).
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def content_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a file, or of a directory's relative names and file contents; None when ``path`` is not
    a local file or directory (a hub dataset name: its content cannot be known here)."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if target.is_file():
        return file_sha256(target)
    if not target.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in target.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(target)}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def model_files_digest(name_or_path: str) -> str:
    """The base's files besides its weights (tokenizer, chat template, configs), for a local directory;
    a hub id is pinned by its fingerprint (the resolved commit) already."""
    model_dir = Path(name_or_path).expanduser()
    if not model_dir.is_dir():
        return "hub"
    digest = hashlib.sha256()
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix not in _WEIGHTS
                       and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(model_dir)}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


@cache
def environment() -> dict[str, Any]:
    """What else decides a stage's output: the pipeline's source (any edit makes every key new), the
    library versions and the device type. Computed once per process."""
    from importlib.metadata import PackageNotFoundError, version

    source = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for file in sorted(package.rglob("*.py")):
        source.update(f"{file.relative_to(package)}\0".encode() + file.read_bytes())
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            versions[name] = "absent"
    return {"pipeline_source": source.hexdigest(), "libraries": versions, "device": device_type(versions["torch"])}


def device_type(torch_version: str) -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``. A CPU-only torch build (version ``+cpu``) cannot see one:
    it is ``cpu`` without importing torch, which would cost a re-run whose stages are all reused seconds."""
    if torch_version.endswith("+cpu"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def key_of(parts: Mapping[str, Any]) -> str:
    """The record key of a stage's inputs (canonical JSON, SHA-256, 24 hex digits)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def execution(compute_seconds: float = 0.0, reused_from: str | None = None) -> dict[str, Any]:
    """What a stage result says about how it was obtained: the seconds spent on its math in this run
    (training loop, generation and scoring, merge and parity logits), or the run it was reused from."""
    return {"compute_seconds": round(compute_seconds, 3), "reused_from": reused_from}


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(source, target)


def _files_under(run_dir: Path, outputs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for output in outputs:
        if output.is_file():
            files.append(output)
        elif output.is_dir():
            files.extend(sorted(p for p in output.rglob("*") if p.is_file()))
    return [f for f in files if f.resolve().is_relative_to(run_dir.resolve())]


def _swap_run_dir(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path under ``old`` moved under ``new`` (recursively)."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, dict):
        return {key: _swap_run_dir(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_swap_run_dir(item, old, new) for item in value]
    return value


@dataclass(frozen=True)
class StageRecord:
    """One stage's record for one key: ``<output_dir>/cache/stages/<stage>/<key>``."""

    stage: str
    root: Path
    inputs: dict[str, Any]

    @classmethod
    def at(cls, output_dir: Path, stage: str, inputs: Mapping[str, Any] | None) -> StageRecord | None:
        """The record for these inputs (None when an input's content is unknown: such a stage always runs)."""
        if inputs is None:
            return None
        parts = {**inputs, "environment": environment()}
        return cls(stage, Path(output_dir) / "cache" / "stages" / stage / key_of(parts), parts)

    @property
    def key(self) -> str:
        return self.root.name

    def restore(self, run_dir: Path) -> dict[str, Any] | None:
        """The recorded result with its files linked into ``run_dir``; None when there is no intact record
        (then says why: no record for these inputs, which inputs changed, or which file is missing or changed)."""
        record = self._read()
        if record is None:
            logger.info("%s: computing (%s)", self.stage, self._why_no_record())
            return None
        files = self.root / "files"
        for name, expected in record["files"].items():
            path = files / name
            intact = path.is_file() and path.stat().st_size == expected["bytes"] and file_sha256(path) == expected["sha256"]
            if not intact:
                logger.warning("%s: record %s is not intact (%s %s): computing again", self.stage, self.key, name,
                               "is missing" if not path.is_file() else "changed")
                return None
        linked: list[Path] = []
        try:
            for name in record["files"]:
                _link_or_copy(files / name, run_dir / name)
                linked.append(run_dir / name)
        except FileNotFoundError:  # replaced by another run meanwhile (same inputs): compute rather than guess
            for path in linked:  # the stage writes these paths: never through a link into another run's file
                path.unlink(missing_ok=True)
            logger.warning("%s: record %s changed while it was being used: computing again", self.stage, self.key)
            return None
        result = _swap_run_dir(record["result"], _RUN_DIR, str(run_dir))
        origin = record["origin"]
        result[EXECUTION] = execution(0.0, origin)
        logger.info("%s: reused the result of run %s (record %s; same inputs)", self.stage, Path(origin).name, self.key)
        return result

    def save(self, run_dir: Path, result: Mapping[str, Any], outputs: Iterable[Path]) -> None:
        """Record ``result`` and the files under ``outputs`` (inside ``run_dir``), atomically; a record that
        another run published meanwhile is kept (same inputs, so the same content)."""
        files = _files_under(run_dir, outputs)
        staging = self.root.parent / f".{self.key}.saving-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
            manifest = {}
            for file in files:
                name = str(file.relative_to(run_dir))
                _link_or_copy(file, staging / "files" / name)
                manifest[name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
            stored = {key: value for key, value in result.items() if key != EXECUTION}
            (staging / RECORD_FILENAME).write_text(json.dumps({
                "stage": self.stage, "origin": str(run_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "inputs": self.inputs, "result": _swap_run_dir(stored, str(run_dir), _RUN_DIR), "files": manifest,
            }, indent=1, default=str))
            if self.root.exists():  # a record that failed its check: replaced
                shutil.rmtree(self.root, ignore_errors=True)
            try:
                os.replace(staging, self.root)
            except OSError:  # another run published the same key first
                return
        except OSError as exc:  # a full disk, say: the stage's result stands, the next run computes again
            logger.warning("%s: its record could not be saved (%s: %s)", self.stage, type(exc).__name__, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / RECORD_FILENAME).read_text())
        except (OSError, ValueError):
            return None

    def _why_no_record(self) -> str:
        """Which inputs differ from the newest record of this stage (what a person asks after a miss)."""
        others = [p for p in self.root.parent.glob("*/" + RECORD_FILENAME) if p.parent != self.root]
        if not others:
            return "no earlier record of this stage"
        newest = max(others, key=lambda p: p.stat().st_mtime)
        try:
            before = json.loads(newest.read_text())["inputs"]
        except (OSError, ValueError, KeyError):
            return "no readable earlier record"
        changed = sorted(key for key in {*before, *self.inputs} if before.get(key) != self.inputs.get(key))
        return "inputs changed since the last record: " + ", ".join(changed) if changed else "no record"


def reused_or_computed(output_dir: Path, stage: str, inputs: Mapping[str, Any] | None, run_dir: Path,
                       compute: Callable[[], dict[str, Any]], outputs: Iterable[Path]) -> dict[str, Any]:
    """``stage``'s result from an intact record of the same ``inputs`` (its files linked into ``run_dir``),
    else ``compute()``'s, whose files under ``outputs`` are then recorded for the next run.

    ``inputs`` None (a content not known here, e.g. hub data) always computes and records nothing.
    """
    record = StageRecord.at(output_dir, stage, inputs)
    reused = record.restore(run_dir) if record is not None else None
    if reused is not None:
        return reused
    result = compute()
    if record is not None:
        record.save(run_dir, result, outputs)
    return result
