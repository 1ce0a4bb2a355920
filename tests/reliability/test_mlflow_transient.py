"""A tracking server that answers 503 twice then recovers: the task's retry gets past it; a 400 is not retried.

Real HTTP against the session's MLflow server (tests/conftest.py ``ops_stack``), through a proxy that injects
the statuses. MLflow's own HTTP retries are switched off so that the task's retry policy is what is tested.
"""

from __future__ import annotations

import pytest

from lora_pipeline import tracking
from tests.helpers.flaky_proxy import flaky_proxy

pytestmark = pytest.mark.slow
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def _log_results_through(proxy_url: str, run_id: str, stack: dict):
    """The ``log_results`` task (retried on transient failures) against the proxy; its final state."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.tracking import log_results

    with temporary_settings({PREFECT_API_URL: stack["PREFECT_API_URL"]}):
        return log_results(tracking.TrackingRun(proxy_url, run_id), {"task/exact_match": 0.75}, {"gate": "passed"},
                           return_state=True)


def test_503_twice_then_ok_is_retried_by_the_task_and_a_400_is_not(ops_stack, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = ops_stack["MLFLOW_TRACKING_URI"]
    run_id = tracking.start_pipeline_run(server, "transient", ops_stack["state"] / "unused", run_name="503", tags={})

    with flaky_proxy(server, {LOG_BATCH: [503, 503]}) as (url, seen):
        state = _log_results_through(url, run_id, ops_stack)
    assert state.is_completed(), state.message
    # One metrics request per attempt (MLflow's own retries are off), then the tags' (the same endpoint): the
    # task's two retries got past the 503s.
    assert [status for _, path, status in seen if path == LOG_BATCH] == [503, 503, 200, 200]
    run = mlflow.MlflowClient(server).get_run(run_id)
    assert run.data.metrics["task/exact_match"] == 0.75 and run.data.tags["gate"] == "passed"

    with flaky_proxy(server, {LOG_BATCH: [400]}) as (url, seen):
        state = _log_results_through(url, run_id, ops_stack)
    assert state.is_failed() and "injected 400" in state.message
    assert [status for _, path, status in seen if path == LOG_BATCH] == [400]  # permanent: not retried
