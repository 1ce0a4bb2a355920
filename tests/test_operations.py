"""Operations on real servers: `make up` (Prefect server and MLflow server on PostgreSQL, a worker), deploy,
a run started through the Prefect API as the UI's run form starts it, the version found in the MLflow
server, a refused run, `make down` (the session's shared stack: tests/conftest.py ``ops_stack``)."""

from __future__ import annotations

import pytest

from tests.helpers.stack import prefect_call, wait_for_flow_run

pytestmark = pytest.mark.slow
MODEL_NAME = "ops-tiny"


def test_a_run_from_the_api_form_trains_on_the_worker_and_registers_in_the_mlflow_server(ops_stack, ops_config_root):
    parameters = {"config_path": str(ops_config_root / "config.yaml"),
                  "overrides": {"train_max_steps": 4, "registry_model_name": MODEL_NAME}}

    async def run(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return await wait_for_flow_run(client, flow_run.id)

    state = prefect_call(ops_stack, run)
    assert state.is_completed(), state.message
    import mlflow

    from lora_pipeline.loading import load_text_generation

    client = mlflow.MlflowClient(ops_stack["MLFLOW_TRACKING_URI"])
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.tags["store"] == "merged" and client.get_registered_model(MODEL_NAME).aliases == {
        "candidate": version.version, "champion": version.version}
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the MLflow server, not a local path
    assert run.data.metrics["train_summary/global_step"] == 4.0
    (ops_stack["state"] / "loaded").mkdir()
    pipe = load_text_generation(f"models:/{MODEL_NAME}/{version.version}", ops_stack["MLFLOW_TRACKING_URI"],
                                dst_dir=ops_stack["state"] / "loaded")  # plain mlflow.transformers.load_model inside
    assert pipe.model.generation_config.eos_token_id


def test_a_run_that_sets_a_forbidden_key_is_refused(ops_stack, ops_config_root):
    from prefect.exceptions import PrefectHTTPStatusError

    async def run(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        return await client.create_flow_run_from_deployment(deployment.id, parameters={
            "config_path": str(ops_config_root / "config.yaml"), "overrides": {"model_trust_remote_code": True}})

    with pytest.raises(PrefectHTTPStatusError, match="'model_trust_remote_code' was unexpected"):
        prefect_call(ops_stack, run)


def test_a_password_in_the_tracking_uri_never_reaches_stdout_params_or_tags(ops_stack, capfd):
    """MLflow prints "View run ... at: <tracking URI>" when a run ends: with user:password@ in the URI (from
    MLFLOW_TRACKING_URI; the config refuses one) that line would carry the password."""
    import uuid

    import mlflow

    from lora_pipeline import tracking

    canary = f"pw-{uuid.uuid4().hex}"
    host = ops_stack["MLFLOW_TRACKING_URI"].removeprefix("http://")
    uri = f"http://alice:{canary}@{host}"  # the stack's server has no auth: the credentials are only carried
    run_id = tracking.start_pipeline_run(uri, "canary", ops_stack["state"] / "unused", run_name="canary",
                                         tags={"tracking_uri": uri})
    tracking.log_params(uri, run_id, {"mlflow.tracking_uri": uri})
    tracking.end_run(uri, run_id)
    captured = capfd.readouterr()
    assert canary not in captured.out + captured.err
    run = mlflow.MlflowClient(ops_stack["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert canary not in str(run.data.params) + str(run.data.tags)
    assert run.data.params["mlflow.tracking_uri"] == f"http://alice:***@{host}"
