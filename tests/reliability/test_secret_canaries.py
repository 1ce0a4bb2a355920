"""Secret canaries through a whole run on the real servers: they appear nowhere.

One run on the session's stack (Prefect and MLflow servers on PostgreSQL, a process worker), started
through the Prefect API as the UI starts it, trains with two processes. Its environment receives, from
Prefect Secret blocks named by ``secrets.env``, four canaries: ``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``
and a ``user:password@`` ``MLFLOW_TRACKING_URI`` (the one the run then uses). A second run's config file holds
a fifth canary in a field (a tracking URI with a password, which the config refuses). Afterwards no canary
is in: the worker's stdout/stderr (flow-run and rank output included), the Prefect logs, parameters and
state messages of both runs and their task runs, the MLflow run's params, tags and artifacts, the model
version and logged model, ``distributed.log`` and every other file under ``output_dir``, any file of the
stack (persisted results included), or a dump of either server's PostgreSQL database.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers.stack import POSTGRES, prefect_call, wait_for_flow_run

pytestmark = pytest.mark.slow
MODEL_NAME = "ops-canary"


def _save_secret_blocks(stack: dict, blocks: dict[str, str]) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["PREFECT_API_URL"]}):
        for name, value in blocks.items():
            Secret(value=value).save(name, overwrite=True)


def _write_config(root: Path, name: str, **changes: dict) -> Path:
    config = yaml.safe_load((root / "config.yaml").read_text())
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def _run_deployment(stack: dict, config_path: Path) -> dict:
    """Start ``finetune`` from its deployment, wait, and gather what Prefect stores about the run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    async def run(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters={
            "config_path": str(config_path), "overrides": {"train_max_steps": 4}})
        state = await wait_for_flow_run(client, flow_run.id)
        flow_run = await client.read_flow_run(flow_run.id)
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        return {"state": state, "flow_run": flow_run.model_dump(mode="json"),
                "task_runs": [t.model_dump(mode="json") for t in task_runs],
                "logs": [log.message for log in logs]}

    return prefect_call(stack, run)


def _readable(path: Path) -> bytes:
    """The file's bytes; for a Prefect result record (JSON, base64 pickle inside) the decoded pickle too."""
    data = path.read_bytes()
    if data.startswith(b'{"metadata"'):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data += base64.b64decode(json.loads(data)["result"])
    return data


def _files_holding(roots: list[Path], canaries: dict[str, str], skip: set[Path]) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and path not in skip:
                data = _readable(path)
                found += [f"{name} in {path}" for name, value in canaries.items() if value.encode() in data]
    return found


def _database_dumps() -> str:
    """Every lora-pipeline stack database on the local PostgreSQL (the session's stack's among them), dumped."""
    names = subprocess.run(["psql", POSTGRES + "/postgres", "-Atc", "select datname from pg_database where datname "
                            "like 'lp\\_%'"], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) >= 2, names  # the stack's Prefect and MLflow databases
    return "".join(subprocess.run(["pg_dump", "--data-only", POSTGRES + "/" + name], capture_output=True, text=True,
                                  check=True).stdout for name in names)


def test_secret_canaries_reach_the_run_and_appear_nowhere_it_writes(ops_stack, ops_config_root):
    import mlflow

    canaries = {name: f"canary-{name}-{uuid.uuid4().hex}" for name in ("hf", "password", "uri", "field")}
    # Searched for whole, and in part: a truncated echo (pydantic's "input_value='http://bob:canary-field-...8d7fd0f@"
    # of a long value) is still a leak. "canary-<name>-" appears nowhere else (block names have no trailing dash).
    pieces = {**canaries, **{f"{name} (head)": f"canary-{name}-" for name in canaries},
              **{f"{name} (tail)": value[-10:] for name, value in canaries.items()}}
    server = ops_stack["MLFLOW_TRACKING_URI"]  # http://127.0.0.1:<port>
    port = server.rsplit(":", 1)[1]
    # "localhost", not the worker's own 127.0.0.1 URI: the run's tracking URI is visibly the block's.
    secret_uri = f"http://alice:{canaries['uri']}@localhost:{port}"
    _save_secret_blocks(ops_stack, {"canary-hf": canaries["hf"], "canary-password": canaries["password"],
                                    "canary-uri": secret_uri})
    secrets = {"env": {"HF_TOKEN": "canary-hf", "MLFLOW_TRACKING_PASSWORD": "canary-password",
                       "MLFLOW_TRACKING_URI": "canary-uri"}}
    config = _write_config(ops_config_root, "canary.yaml", secrets=secrets, registry={"model_name": MODEL_NAME},
                           train={"num_processes": 2})
    field_config = _write_config(ops_config_root, "canary-field.yaml", registry={"model_name": f"{MODEL_NAME}-field"},
                                 mlflow={"tracking_uri": f"http://bob:{canaries['field']}@localhost:{port}"})

    run = _run_deployment(ops_stack, config)
    refused = _run_deployment(ops_stack, field_config)

    # The canaries did their job: the run trained in two processes and registered through the block's URI ...
    assert run["state"].is_completed(), run["state"].message
    client = mlflow.MlflowClient(server)
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.params["train.num_processes"] == "2"
    (summary,) = [p for p in ops_config_root.glob("outputs/runs/*/summary.json")
                  if json.loads(p.read_text())["flow_run_id"] == run["flow_run"]["id"]]
    assert f"localhost:{port}" in json.loads(summary.read_text())["mlflow_tracking_uri"]
    distributed_logs = list(summary.parent.rglob("distributed.log"))
    assert distributed_logs and all(p.stat().st_size for p in distributed_logs)
    # ... and the field's was refused by the rule, without being echoed.
    assert refused["state"].is_failed()
    assert "mlflow.tracking_uri must not hold a password" in refused["state"].message

    logged_model = client.get_logged_model(version.source.removeprefix("models:/"))
    leaks = []
    for name, value in pieces.items():
        for what, stored in (("Prefect flow runs, task runs and logs", json.dumps([run, refused], default=str)),
                             ("MLflow run", json.dumps([mlflow_run.data.params, mlflow_run.data.tags])),
                             ("model version", json.dumps([version.tags, version.description, version.source])),
                             ("logged model", json.dumps(logged_model.to_dictionary(), default=str))):
            if value in stored:
                leaks.append(f"{name} in {what}")
    # Files: the stack's (worker stdout/stderr, server logs, MLflow artifacts, persisted Prefect results, decoded)
    # and the outputs (distributed.log, summaries, checkpoints, reports); the two config files are the inputs.
    leaks += _files_holding([ops_stack["state"], ops_config_root], pieces, skip={field_config})
    dump = _database_dumps()
    leaks += [f"{name} in a database dump" for name, value in pieces.items() if value in dump]
    assert leaks == []
