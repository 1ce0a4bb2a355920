"""Operations on real servers: `make up` (Prefect server and MLflow server on PostgreSQL, a worker), deploy,
a run started through the Prefect API as the UI's run form starts it, the version found in the MLflow
server, a refused run, `make down`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers.configs import write_tiny_config
from tests.helpers.serving import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("LORA_PIPELINE_POSTGRES_URL", "postgresql://root@127.0.0.1:5432")
MODEL_NAME = "ops-tiny"


@pytest.fixture(scope="module")
def config_root(tiny_model_dir, tmp_path_factory) -> Path:
    """A config directory the worker may read (LORA_PIPELINE_CONFIG_ROOTS): a tiny model, a few steps."""
    root = tmp_path_factory.mktemp("configs")
    write_tiny_config(root, tiny_model_dir, "not-this-one")
    return root


@pytest.fixture(scope="module")
def stack(config_root, tmp_path_factory):
    """`make up` on free ports and fresh PostgreSQL databases; `make down` (databases dropped) afterwards."""
    state = tmp_path_factory.mktemp("stack")
    args = (f"--dir {state} --db-prefix lp_{uuid.uuid4().hex[:10]} --prefect-port {free_port()} "
            f"--mlflow-port {free_port()} --config-roots {config_root}")
    make = ["make", "--no-print-directory", "-C", str(REPO), f"POSTGRES_URL={POSTGRES}", f"STACK_ARGS={args}"]
    up = subprocess.run([*make, "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    exports = dict(line.removeprefix("export ").split("=", 1) for line in (state / "env").read_text().splitlines())
    try:
        yield {"state": state, **exports}
    finally:
        subprocess.run([*make, "down", f"STACK_ARGS={args} --drop"], capture_output=True, timeout=120)
        assert not (state / "pids.json").exists()


def _prefect(stack: dict, coroutine_factory):
    """Run a Prefect client coroutine against the stack's API."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        with temporary_settings({PREFECT_API_URL: stack["PREFECT_API_URL"]}):
            async with get_client() as client:
                return await coroutine_factory(client)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def deployed(stack):
    env = {**os.environ, "PREFECT_API_URL": stack["PREFECT_API_URL"], "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "lora_pipeline.cli", "deploy"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return stack


def test_a_run_from_the_api_form_trains_on_the_worker_and_registers_in_the_mlflow_server(deployed, config_root):
    parameters = {"config_path": str(config_root / "config.yaml"),
                  "overrides": {"train_max_steps": 4, "registry_model_name": MODEL_NAME}}

    async def run(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + 600
        while not (state := (await client.read_flow_run(flow_run.id)).state).is_final():
            assert time.monotonic() < deadline, "the run did not finish"
            await asyncio.sleep(2)
        return state

    state = _prefect(deployed, run)
    assert state.is_completed(), state.message
    import mlflow

    from lora_pipeline.loading import load_text_generation

    client = mlflow.MlflowClient(deployed["MLFLOW_TRACKING_URI"])
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.tags["store"] == "merged" and client.get_registered_model(MODEL_NAME).aliases == {
        "candidate": version.version, "champion": version.version}
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the MLflow server, not a local path
    assert run.data.metrics["train_summary/global_step"] == 4.0
    (deployed["state"] / "loaded").mkdir()
    pipe = load_text_generation(f"models:/{MODEL_NAME}/{version.version}", deployed["MLFLOW_TRACKING_URI"],
                                dst_dir=deployed["state"] / "loaded")  # plain mlflow.transformers.load_model inside
    assert pipe.model.generation_config.eos_token_id


def test_a_run_that_sets_a_forbidden_key_is_refused(deployed, config_root):
    from prefect.exceptions import PrefectHTTPStatusError

    async def run(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        return await client.create_flow_run_from_deployment(deployment.id, parameters={
            "config_path": str(config_root / "config.yaml"), "overrides": {"model_trust_remote_code": True}})

    with pytest.raises(PrefectHTTPStatusError, match="'model_trust_remote_code' was unexpected"):
        _prefect(deployed, run)
