"""A stopped stage takes its whole process tree with it (torchrun and its ranks): nothing is orphaned."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.processes import run_process_group

#: A parent that starts a grandchild and records its pid: like torchrun and a rank.
TREE = ("import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(300)")


def hung_tree(pid_file: Path) -> list[str]:
    """The command of a hung process tree whose grandchild's pid lands in ``pid_file``."""
    return [sys.executable, "-c", TREE, str(pid_file)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped by its (dead) parent


def wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def assert_grandchild_gone(pid_file: Path) -> None:
    """The grandchild recorded in ``pid_file`` is dead (within a few seconds)."""
    wait_for(pid_file)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


def test_an_interrupted_wait_stops_the_whole_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"

    def interrupt(signum, frame):
        raise TimeoutError("the stage's timeout")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        with pytest.raises(TimeoutError):
            run_process_group(hung_tree(pid_file), poll_seconds=0.2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert_grandchild_gone(pid_file)


def test_a_finished_group_returns_its_exit_code():
    assert run_process_group([sys.executable, "-c", "raise SystemExit(7)"]) == 7
