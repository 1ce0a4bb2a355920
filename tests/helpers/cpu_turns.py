"""Turns on the CPU between pytest-xdist workers: a few builds must have the machine to themselves.

`make test` runs the suite on two workers, one torch thread each, so that they fill the two cores. A build
that is fixed at two threads (the demo world pre-trains on ``demo.pretrain_threads = 2``, part of its key)
slows down many times over when one of its threads waits on a core the other worker holds: every small op
waits for both threads. So such a build takes the CPU *exclusively*: it waits until the other worker's
current test ends, and that worker's next test waits until the build is done. Every test takes the CPU
*shared* (``tests/conftest.py``), which costs one uncontended lock when nothing is exclusive.

A writer-preferring lock from two ``flock`` files: a waiting exclusive holder closes the turnstile, so that
tests starting meanwhile queue behind it instead of starving it. Outside xdist (one process) both are no-ops.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

#: Set in each xdist worker's environment by pytest-xdist.
WORKER_VARIABLE = "PYTEST_XDIST_WORKER"
#: The directory of the two lock files: made by the controller (tests/conftest.py), inherited by the workers.
LOCK_DIR_VARIABLE = "LORA_PIPELINE_TEST_CPU_LOCKS"
#: What caps a worker (and what it starts) at one thread; an exclusive holder's subprocesses go without.
THREAD_CAPS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def in_worker() -> bool:
    """Whether this process is a pytest-xdist worker."""
    return bool(os.environ.get(WORKER_VARIABLE))


#: This worker's shared hold while a test runs (an open handle on the lock file), for exclusive_cpu to convert.
_shared_hold: IO[str] | None = None


def _lock_file(name: str) -> IO[str]:
    return (Path(os.environ[LOCK_DIR_VARIABLE]) / name).open("a")


def _turnstile() -> IO[str]:
    handle = _lock_file("cpu-turnstile.lock")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@contextmanager
def shared_cpu() -> Iterator[None]:
    """Hold the CPU with the other worker's tests (waits while an exclusive build holds it or waits for it)."""
    global _shared_hold
    if not in_worker():
        yield
        return
    _turnstile().close()  # closed while an exclusive holder waits: no new shared holder slips past it
    hold = _lock_file("cpu.lock")
    fcntl.flock(hold, fcntl.LOCK_SH)
    _shared_hold = hold
    try:
        yield
    finally:
        _shared_hold = None
        hold.close()  # releases the lock


@contextmanager
def exclusive_cpu() -> Iterator[None]:
    """Hold the CPU alone: wait for the other worker's current test to end; its next one waits for this.

    Called from inside a test (or its fixture), which holds the CPU shared: that hold is given up before
    waiting (so two workers asking at once cannot wait on each other) and taken back after.
    """
    if not in_worker():
        yield
        return
    hold = _shared_hold or _lock_file("cpu.lock")
    fcntl.flock(hold, fcntl.LOCK_UN)
    with _turnstile():
        fcntl.flock(hold, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if hold is _shared_hold:
            fcntl.flock(hold, fcntl.LOCK_SH)
        else:
            hold.close()


def without_thread_caps(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a subprocess started while holding the CPU exclusively: torch's default threads (all cores)."""
    if not in_worker():
        return env
    return {key: value for key, value in env.items() if key not in THREAD_CAPS}
