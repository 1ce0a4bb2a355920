"""A hung stage hits its timeout and takes its whole process tree with it; a transient failure is retried.

A stopped stage's children (torchrun and its ranks) are never orphaned, whether the wait is interrupted or the
Prefect task's timeout fires. A transient error (a dropped connection) is retried by the task; a permanent one
(a bug) is not.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.processes import run_process_group
from lora_pipeline.run_request import as_worker

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


def test_a_hung_stage_hits_its_timeout_and_takes_its_process_tree_with_it(prefect_api, tmp_path):
    """A stage's child processes (torchrun and its ranks, here a hung parent and grandchild) are gone once
    its Prefect timeout fires; the task run ends TimedOut (a failed state)."""
    from prefect import flow, task

    from lora_pipeline.processes import run_process_group

    pid_file = tmp_path / "grandchild.pid"

    @task(timeout_seconds=4)
    def hung_stage() -> int:
        return run_process_group(hung_tree(pid_file), poll_seconds=0.2)

    @flow
    def pipeline() -> tuple[str, bool]:
        state = hung_stage(return_state=True)
        return state.name, state.is_failed()

    assert pipeline() == ("TimedOut", True)
    assert_grandchild_gone(pid_file)


@pytest.fixture(scope="module")
def e2e_tiny_version_1(small_config):
    """Version 1 of e2e-tiny in ``small_config``'s registry, for the retry test to promote (in
    tests/test_flow_e2e.py the module's earlier flow runs registered it)."""
    from mlflow import MlflowClient

    outputs = small_config.parent / "outputs"
    outputs.mkdir(exist_ok=True)
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("e2e-tiny")
    assert str(client.create_model_version("e2e-tiny", source=str(outputs)).version) == "1"


@pytest.mark.usefixtures("e2e_tiny_version_1")
def test_a_transient_failure_is_retried_by_the_task_and_a_permanent_one_is_not(prefect_api, small_config,
                                                                               monkeypatch):
    from flows.promote import promote

    from lora_pipeline import promotion

    real, attempts = promotion.promote, []

    def flaky(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionResetError("the registry dropped the connection")
        return real(*args, **kwargs)

    monkeypatch.setattr(promotion, "promote", flaky)
    with as_worker(small_config):
        assert promote(model_name="e2e-tiny", version="1", reason="flaky", config_path=str(small_config),
                       force=True)["champion"] == "1"
    assert len(attempts) == 2  # retried once, after a backoff
    attempts.clear()
    monkeypatch.setattr(promotion, "promote", lambda *a, **k: attempts.append(1) or (_ for _ in ()).throw(
        KeyError("a bug")))
    with as_worker(small_config), pytest.raises(KeyError):
        promote(model_name="e2e-tiny", version="1", reason="bug", config_path=str(small_config))
    assert len(attempts) == 1  # permanent: not retried
