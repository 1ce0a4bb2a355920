"""The turns two pytest-xdist workers take on the CPU (tests/helpers/cpu_turns.py), between real processes."""

from __future__ import annotations

import multiprocessing
import os
import queue

from tests.helpers import cpu_turns

WAIT = 0.5  # long enough for a process that is not blocked to get in


def _as_worker(lock_dir: str) -> None:
    os.environ[cpu_turns.WORKER_VARIABLE] = "gw-test"
    os.environ[cpu_turns.LOCK_DIR_VARIABLE] = lock_dir


def _test_process(lock_dir: str, name: str, entered, leave, exclusive_inside: bool = False) -> None:
    """A test holding the CPU shared; with ``exclusive_inside``, its fixture then asks for the CPU alone."""
    _as_worker(lock_dir)
    with cpu_turns.shared_cpu():
        if exclusive_inside:
            with cpu_turns.exclusive_cpu():
                entered.put(name)
                leave.wait(30)
        else:
            entered.put(name)
            leave.wait(30)


def _start(context, *args, **kwargs):
    process = context.Process(target=_test_process, args=args, kwargs=kwargs)
    process.start()
    return process


def _nobody_enters(entered, why: str) -> None:
    try:
        name = entered.get(timeout=WAIT)
    except queue.Empty:
        return
    raise AssertionError(f"{name} started {why}")


def test_an_exclusive_build_waits_for_the_other_workers_test_and_the_next_test_waits_for_it(tmp_path):
    context = multiprocessing.get_context("fork")
    entered = context.Queue()
    leave_other, leave_build, leave_next = context.Event(), context.Event(), context.Event()
    other = _start(context, str(tmp_path), "other", entered, leave_other)
    assert entered.get(timeout=10) == "other"
    build = _start(context, str(tmp_path), "build", entered, leave_build, exclusive_inside=True)
    _nobody_enters(entered, "while the other worker's test held the CPU")
    following = _start(context, str(tmp_path), "next", entered, leave_next)
    _nobody_enters(entered, "while a build waited for the CPU: it would starve the build")
    leave_other.set()
    assert entered.get(timeout=10) == "build"
    _nobody_enters(entered, "while the build held the CPU alone")
    leave_build.set()
    assert entered.get(timeout=10) == "next"
    leave_next.set()
    for process in (other, build, following):
        process.join(10)
        assert process.exitcode == 0


def test_tests_share_the_cpu_and_outside_xdist_nothing_waits(tmp_path):
    context = multiprocessing.get_context("fork")
    entered, leave = context.Queue(), context.Event()
    first = _start(context, str(tmp_path), "first", entered, leave)
    second = _start(context, str(tmp_path), "second", entered, leave)
    assert {entered.get(timeout=10), entered.get(timeout=10)} == {"first", "second"}
    leave.set()
    for process in (first, second):
        process.join(10)
        assert process.exitcode == 0
    # One process (no xdist worker): both are no-ops, even with no lock directory at all.
    env = {key: os.environ.pop(key) for key in (cpu_turns.WORKER_VARIABLE, cpu_turns.LOCK_DIR_VARIABLE)
           if key in os.environ}
    try:
        with cpu_turns.shared_cpu(), cpu_turns.exclusive_cpu():
            pass
    finally:
        os.environ.update(env)
