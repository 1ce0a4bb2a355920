"""Build a cached directory once, crash- and race-safe: staging directory, marker written last, atomic rename.

Used for what is expensive to make and keyed by its inputs: the demo world (by spec hash) and a
de-quantised GGUF base (by file hash). A directory without its marker is debris and never trusted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"


def build_once(final: Path, build: Callable[[Path], None], log: Callable[[str], None], what: str) -> Path:
    """``final`` if it is complete; else ``build(staging)`` beside it and move the result into place.

    Args:
        final: The cache entry (its name is the key of what it holds).
        build: Writes everything into the directory it is given, ending with ``COMPLETE_MARKER``.
        log: Receives progress lines.
        what: Names the entry in log lines (e.g. "demo world").

    Returns:
        ``final``, complete: built here, or by a concurrent process that got there first.
    """
    if (final / COMPLETE_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log(f"{what}: building {final.name} in {staging}")
    try:
        build(staging)
        if not (staging / COMPLETE_MARKER).is_file():
            raise RuntimeError(f"{what}: the build of {final.name} did not write its {COMPLETE_MARKER} marker")
        _publish(staging, final, log, what)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left over if the build failed or lost a race
    return final


def _publish(staging: Path, final: Path, log: Callable[[str], None], what: str) -> None:
    """Atomically move a finished build into place, unless a concurrent build got there first."""
    if final.exists() and not (final / COMPLETE_MARKER).is_file():
        shutil.rmtree(final)  # debris without the marker is never trusted
    try:
        os.replace(staging, final)
    except OSError:
        if not (final / COMPLETE_MARKER).is_file():
            raise
        log(f"{what}: {final.name} was completed by another process; using it")
        return
    log(f"{what}: ready at {final}")
