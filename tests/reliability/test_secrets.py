"""Secrets reach the run and nothing it writes: a Prefect Secret block's value, a tracking URI's password.

The value of a block named in ``secrets.env`` is in the run's environment and redacted from its Prefect logs,
summary, failure notice, MLflow params and tags and files; a tracking URI with credentials reaches the training
ranks through their environment, never their command line or a file. (The redaction itself: test_redaction.py.)
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from lora_pipeline.config_files import load_config
from tests.helpers.flows import NOTIFY, run_flow


def test_a_secret_block_reaches_the_run_environment_and_never_its_logs_summary_notices_or_mlflow(
        prefect_api, alerts, small_config, tmp_path, monkeypatch):
    """``secrets.env`` names a Prefect Secret block; the run sees its value in its environment, and the value
    is redacted wherever the run writes: Prefect logs (a traceback included), the summary, the failure notice,
    MLflow params and tags, and every file under output_dir."""
    import os
    import uuid

    from mlflow import MlflowClient
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from lora_pipeline import stages
    from lora_pipeline.redaction import forget_secrets

    canary = f"canary-{uuid.uuid4().hex}"
    Secret(value=canary).save("e2e-canary", overwrite=True)
    seen = {}

    def leaky_stage(*args, **kwargs):  # a stage that uses the credential and then fails with it in the error
        from prefect import get_run_logger

        seen["value"] = os.environ.get("LP_TEST_DB_PASSWORD")
        get_run_logger().warning("connecting with password %s", seen["value"])  # shipped to the Prefect API
        raise RuntimeError(f"login refused: postgresql://svc:{seen['value']}@db.internal/x (password {seen['value']})")

    monkeypatch.setattr(stages, "validate_data", leaky_stage)
    summary_path = tmp_path / "summary.json"
    alerts.clear()
    try:
        with pytest.raises(RuntimeError):
            run_flow(small_config, NOTIFY, "secrets.env.LP_TEST_DB_PASSWORD=e2e-canary", "registry.model_name=e2e-secret",
                     summary_json=summary_path)
        assert seen["value"] == canary  # the block's value was in the run's environment
    finally:
        os.environ.pop("LP_TEST_DB_PASSWORD", None)
        forget_secrets()
    summary = json.loads(summary_path.read_text())
    assert canary not in summary_path.read_text() and "password ***" in summary["error"]
    (message,) = alerts
    assert canary not in json.dumps(message) and "password ***" in message["body"]

    async def logs():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["flow_run_id"]])))

    import asyncio
    import time

    deadline = time.monotonic() + 30  # the API log handler ships records in batches
    while not any("connecting with password" in log.message for log in asyncio.run(logs())):
        assert time.monotonic() < deadline, "the run's logs never reached the Prefect API"
        time.sleep(1)
    messages = [log.message for log in asyncio.run(logs())]
    assert any("connecting with password ***" in line for line in messages), messages
    assert any("Traceback" in line for line in messages)  # the failure's traceback was logged ...
    assert not [line for line in messages if canary in line]  # ... redacted, like every other line

    async def states():
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            flow_run = await client.read_flow_run(summary["flow_run_id"])
            task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                any_=[flow_run.id])))
            return flow_run, task_runs

    flow_run, task_runs = asyncio.run(states())
    (failed,) = [t for t in task_runs if t.state.is_failed()]
    # The state messages the UI shows (Prefect makes them from the exception, past any log redaction).
    assert failed.name.startswith("validate_data") and "password ***" in failed.state.message
    assert canary not in failed.state.message + flow_run.state.message
    # The failed task's persisted result (its exception) and every other stored result: base64 pickles.
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    for path in Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser().glob("*"):
        record = path.read_bytes() if path.is_file() else b""
        if record.startswith(b'{"metadata"'):
            assert canary.encode() not in base64.b64decode(json.loads(record)["result"]), path
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert canary not in json.dumps([run.data.params, run.data.tags])
    assert run.data.params["secrets.env.LP_TEST_DB_PASSWORD"] == "***"  # a secret-looking key: even the block name
    for path in (small_config.parent / "outputs").rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path


def test_a_tracking_uri_with_credentials_reaches_the_ranks_through_the_environment_only(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """Not on the torchrun command line (``ps`` shows it), not in distributed.log, not in any file of the run."""
    from lora_pipeline import distributed
    from lora_pipeline.tracking import TrackingRun

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "data.path=rows.jsonl",
                             "train.num_processes=2"])
    launched: list[tuple[list[str], dict]] = []

    def fake_run(command, env=None, **kwargs):
        launched.append((command, env))
        result_json = Path(command[command.index("--result-json") + 1])
        result_json.write_text(json.dumps({"adapter_dir": "a", "metrics": {"world_size": 2.0}}))
        return 0

    monkeypatch.setattr(distributed, "run_process_group", fake_run)
    secret_uri = "https://alice:pa55-canary@mlflow.internal"
    distributed.launch_training(cfg, tmp_path / "t.jsonl", tmp_path / "run", tmp_path / "ckpt",
                                TrackingRun(tracking_uri=secret_uri, run_id="r1"))
    (command, env), = launched
    assert "pa55-canary" not in " ".join(command) and "--tracking-uri" not in command
    assert env[distributed.TRACKING_URI_ENV] == secret_uri and command[command.index("--run-id") + 1] == "r1"
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"pa55-canary" not in path.read_bytes(), path
    launched.clear()  # without credentials the URI is an ordinary argument, as before
    distributed.launch_training(cfg, tmp_path / "t.jsonl", tmp_path / "run", tmp_path / "ckpt",
                                TrackingRun(tracking_uri="http://127.0.0.1:5000", run_id="r1"))
    (command, env), = launched
    assert command[command.index("--tracking-uri") + 1] == "http://127.0.0.1:5000"
    assert distributed.TRACKING_URI_ENV not in env
