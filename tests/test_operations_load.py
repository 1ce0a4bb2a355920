"""Many runs against the servers at once: ten flow runs for ten model names, plus two for one model name, all
created through the Prefect API from the `finetune` deployment and run by the stack's worker together
(Prefect server and MLflow server on PostgreSQL: tests/conftest.py ``ops_stack``).

- every run completes, and no log (the runs' own, the worker's, the servers') says "database is locked";
- the two runs of one model were serialised by its concurrency limit: one run's training-to-aliases
  window ended before the other's began.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from tests.helpers.stack import prefect_call, wait_for_flow_run

pytestmark = pytest.mark.slow
DIFFERENT = [f"load-{index}" for index in range(10)]
SAME = "load-same"
LOCKED_WINDOW = ("train_qlora", "apply_aliases")  # what flows/finetune.py holds the model's slot for


def _parameters(config: Path, model_name: str, learning_rate: float) -> dict:
    # A learning rate per run: a run key per run (the model name is not part of it), so no two runs share a
    # checkpoint directory: this test is about the servers, not about identical runs.
    return {"config_path": str(config),
            "overrides": {"train_max_steps": 2, "train_learning_rate": learning_rate, "registry_model_name": model_name}}


@pytest.fixture(scope="module")
def load_config_path(ops_config_root) -> Path:
    """The session's tiny config, lighter still: twelve runs share two cores, and the full-precision base's
    extra evaluation says nothing about the servers."""
    config = yaml.safe_load((ops_config_root / "config.yaml").read_text())
    config["eval"]["full_precision_base"] = False
    path = ops_config_root / "load.yaml"  # inside the worker's config roots
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def load_runs(ops_stack, load_config_path):
    """Create all twelve runs at once, wait for every one; return their final states and task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    runs = [(name, 1e-3 + index * 1e-4) for index, name in enumerate(DIFFERENT)]
    runs += [(SAME, 5e-3), (SAME, 6e-3)]

    async def go(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        created = [await client.create_flow_run_from_deployment(
            deployment.id, parameters=_parameters(load_config_path, name, rate), tags=["load-test"])
            for name, rate in runs]
        states = await asyncio.gather(*(wait_for_flow_run(client, run.id, timeout=1500) for run in created))
        logs = {}
        task_runs = {}
        for run in created:
            logs[run.id] = [log.message for log in await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200)]
            task_runs[run.id] = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        return [(name, run, state, logs[run.id], task_runs[run.id])
                for (name, _), run, state in zip(runs, created, states)]

    return prefect_call(ops_stack, go)


def test_ten_runs_for_ten_models_complete_on_the_servers_without_a_locked_database(load_runs, ops_stack):
    import mlflow

    failed = [(name, state.name, state.message) for name, _, state, _, _ in load_runs if not state.is_completed()]
    assert not failed, failed
    for name, run, _, logs, _ in load_runs:
        assert logs, f"no logs reached the server for {name}"
        assert not [line for line in logs if "database is locked" in line], name
    for log in (ops_stack["state"] / "logs").glob("*.log"):
        assert "database is locked" not in log.read_text(errors="replace"), log
    client = mlflow.MlflowClient(ops_stack["MLFLOW_TRACKING_URI"])
    for name in DIFFERENT:
        assert len(client.search_model_versions(f"name = '{name}'")) == 1, name
    assert len(client.search_model_versions(f"name = '{SAME}'")) == 2


def test_two_runs_of_one_model_are_serialised_by_its_concurrency_limit(load_runs):
    windows = []
    for name, _, _, _, task_runs in load_runs:
        if name != SAME:
            continue
        by_task = {run.name.rsplit("-", 1)[0]: run for run in task_runs}
        first, last = (by_task[task] for task in LOCKED_WINDOW)
        windows.append((first.start_time, last.end_time))
    (a_start, a_end), (b_start, b_end) = sorted(windows)
    assert a_end <= b_start, f"the two runs of {SAME} overlapped: {windows}"
