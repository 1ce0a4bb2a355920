"""Checkpoints that survive crashes: a checkpoint counts only once it is complete and intact.

The Trainer writes ``checkpoint-N/`` file by file, so a crash (SIGKILL, node loss) mid-save leaves a
directory that looks like a checkpoint but is not. After the Trainer has finished writing one, rank 0
adds a manifest (every file with its size and SHA-256), written to a temporary name and renamed, so the
manifest exists only for a finished save. On start, the newest checkpoint whose manifest matches its
files is resumed from; newer ones that are incomplete or corrupt are moved aside (never deleted) with
the reason in their new name, and a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_pipeline.base_model import file_sha256

logger = logging.getLogger(__name__)

MANIFEST_NAME = "pipeline-checkpoint-manifest.json"
SET_ASIDE_DIRNAME = "set-aside"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_manifest(checkpoint_dir: Path) -> Path:
    """Record every file of a finished checkpoint (size + SHA-256); atomic: temp file, then rename."""
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {str(p.relative_to(checkpoint_dir)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    target = checkpoint_dir / MANIFEST_NAME
    tmp = checkpoint_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"files": manifest}, indent=1))
    os.replace(tmp, target)
    return target


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """Why ``checkpoint_dir`` cannot be resumed from (None when it is complete and intact)."""
    manifest_path = checkpoint_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return "incomplete"  # the save never finished: no manifest
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "corrupt-manifest"
    for name, expected in files.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return "missing-file"
        if path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
            return "corrupt-file"
    return None


def _step(path: Path) -> int:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def latest_valid_checkpoint(checkpoint_root: Path, set_aside: bool = True) -> Path | None:
    """The newest intact checkpoint under ``checkpoint_root``; newer broken ones are moved aside.

    Args:
        checkpoint_root: The Trainer's ``output_dir`` for this run key (``checkpoint-N`` folders).
        set_aside: Move broken ones aside (rank 0 only: under DDP every rank chooses, and ranks moving the
            same directory at once would race; the others skip broken ones and choose the same checkpoint).

    Returns:
        The checkpoint to resume from, or None (start from scratch).
    """
    if not checkpoint_root.is_dir():
        return None
    candidates = sorted((p for p in checkpoint_root.iterdir() if p.is_dir() and _step(p) >= 0), key=_step, reverse=True)
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if not set_aside:
            continue
        aside = checkpoint_root / SET_ASIDE_DIRNAME / f"{candidate.name}-{problem}-{time.strftime('%Y%m%dT%H%M%S')}"
        aside.parent.mkdir(exist_ok=True)
        os.replace(candidate, aside)
        logger.warning("checkpoint %s is %s: moved to %s; resuming from an earlier one", candidate.name, problem, aside)
    return None


class ManifestCallback(TrainerCallback):
    """After each checkpoint save, rank 0 writes its manifest (making it resumable)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")


@contextmanager
def exclusive_run_key(checkpoint_root: Path) -> Iterator[None]:
    """Hold the run key's lock (``<checkpoint_root>.lock``, an OS file lock) while training it.

    Two runs of the same training (same run key) share one checkpoint directory: without the lock their
    checkpoints would interleave. The second run waits, then finds the first one's checkpoints and
    resumes from (or reuses) them. The OS drops the lock when its holder dies, so a killed run never
    blocks the next one.
    """
    import fcntl

    checkpoint_root.parent.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_root.with_name(checkpoint_root.name + ".lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another run is training run key %s: waiting for it to finish", checkpoint_root.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class DiskFullError(RuntimeError):
    """The disk filled up while a checkpoint was written; the earlier checkpoints are intact."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; the next run of the same training resumes there."""


class StopOnSignal(TrainerCallback):
    """SIGTERM (a pod eviction, a cancelled flow run, ``kill``): save a checkpoint at the end of the current
    step, then stop, so the work done since the last periodic checkpoint is not lost.

    Under DDP every rank must stop at the same step, so the ranks agree on it (one MAX all-reduce of a flag
    per step; a rank whose launcher forwarded the signal a moment later stops with the others).
    """

    def __init__(self) -> None:
        self.received: int | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Catch SIGTERM while the block runs (main thread only: Python delivers signals there)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

    def _any_rank_received(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = float(self.received is not None)
        if dist.is_available() and dist.is_initialized():
            tensor = torch.tensor([flag])
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = float(tensor.item())
        return flag > 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._any_rank_received():
            self.received = self.received or 15
            control.should_save = True
            control.should_training_stop = True
