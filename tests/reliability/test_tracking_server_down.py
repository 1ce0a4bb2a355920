"""The tracking server goes down during training: training goes on, the stage's retry completes the run, and
a run that cannot finish is never left FINISHED in MLflow (nor registered)."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest

from tests.helpers.flows import run_flow

pytestmark = pytest.mark.slow


def _task_runs(flow_run_id: str) -> dict[str, int]:
    """Task name -> run count (attempts) of one flow run's task runs."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return {run.name.rsplit("-", 1)[0]: run.run_count for run in asyncio.run(read())}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_tracking_server_down_during_training_costs_step_metrics_not_the_run(prefect_api, small_config, tmp_path,
                                                                            monkeypatch):
    from lora_pipeline import tracking

    real_log_artifacts, refused = tracking.log_artifacts, []

    def server_down(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    def still_down_at_the_end_of_training(uri, run_id, path, artifact_path=None):
        if artifact_path == "train" and len(refused) < 2:  # down for the loss curve's first two attempts
            refused.append(path)
            raise ConnectionRefusedError("tracking server unreachable")
        return real_log_artifacts(uri, run_id, path, artifact_path)

    monkeypatch.setattr(tracking, "log_step_metrics", server_down)
    monkeypatch.setattr(tracking, "log_artifacts", still_down_at_the_end_of_training)
    warnings = _Lines()
    logging.getLogger("lora_pipeline.training").addHandler(warnings)
    # A learning rate of its own: a training of its own (not resumed from another test's finished one).
    summary = run_flow(small_config, "registry.model_name=e2e-tracking-down", "train.learning_rate=0.00031",
                       summary_json=tmp_path / "summary.json")
    logging.getLogger("lora_pipeline.training").removeHandler(warnings)
    assert summary["status"] == "completed" and len(refused) == 2
    dropped = [line for line in warnings.lines if "not logged" in line]  # each step's metrics dropped, said so
    assert dropped and all("training goes on" in line for line in dropped), dropped
    attempts = _task_runs(summary["flow_run_id"])
    assert attempts["train_qlora"] == 3  # the stage's retries got past the outage ...
    assert summary["train"]["global_step"] == 6  # ... without training again from scratch
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "train")]  # the full loss curve, logged late
    assert "train/loss" not in run.data.metrics  # the per-step metrics were dropped, not buffered


def test_a_run_whose_registration_never_gets_through_is_failed_in_mlflow_and_registers_nothing(
        prefect_api, small_config, tmp_path, monkeypatch):
    from lora_pipeline import stages

    def registry_down(*args, **kwargs):
        raise ConnectionRefusedError("model registry unreachable")

    monkeypatch.setattr(stages, "register", registry_down)
    summary_path = tmp_path / "summary.json"
    with pytest.raises(ConnectionRefusedError):
        run_flow(small_config, "registry.model_name=e2e-registry-down", summary_json=summary_path)
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("register: ConnectionRefusedError")
    assert _task_runs(summary["flow_run_id"])["register"] == 4  # every retry spent
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FAILED"
    assert client.search_model_versions("name = 'e2e-registry-down'") == []
