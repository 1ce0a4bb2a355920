"""Deployments are declared once, in prefect.yaml, and build into Prefect deployments of the real flows."""

from pathlib import Path

from deployments.serve import REPO_ROOT, build_deployments, load_declarations


def test_prefect_yaml_declares_the_finetune_promote_and_evaluate_deployments_on_one_work_pool():
    declarations = {item["name"]: item for item in load_declarations()}
    assert set(declarations) == {"finetune-weekly", "finetune", "promote", "evaluate"}
    assert {item["work_pool"]["name"] for item in declarations.values()} == {"lora-pipeline"}
    for item in declarations.values():
        path, _, function = item["entrypoint"].partition(":")
        assert (REPO_ROOT / path).is_file() and function
        config = item.get("parameters", {}).get("config_path")
        assert config is None or (REPO_ROOT / config).is_file()


def test_deployments_build_with_schedule_and_validated_parameters():
    from prefect.utilities.callables import parameter_schema

    deployments = {d.name: d for d in build_deployments()}
    weekly = deployments["finetune-weekly"]
    assert weekly.schedules and weekly.schedules[0].schedule.cron == "0 3 * * 1"
    assert weekly.schedules[0].schedule.timezone == "Europe/Berlin"
    assert weekly.parameters == {"config_path": "configs/demo.yaml"}
    assert deployments["finetune"].schedules in (None, [])
    # The run form Prefect renders: config_path and the typed overrides, which accept nothing else.
    assert deployments["finetune"].enforce_parameter_schema  # the API validates run parameters
    from flows.finetune import finetune

    schema = parameter_schema(finetune).model_dump()
    assert set(schema["properties"]) == {"config_path", "overrides"}
    overrides = schema["definitions"]["RunOverrides"]
    assert overrides["additionalProperties"] is False
    assert set(overrides["properties"]) == {"data_path", "train_max_steps", "train_learning_rate", "lora_r",
                                            "registry_model_name"}
    from flows.promote import promote

    assert set(parameter_schema(promote).model_dump()["required"]) == {"model_name", "version", "reason"}
    from flows.evaluate import evaluate_version

    evaluate_schema = parameter_schema(evaluate_version).model_dump()
    assert set(evaluate_schema["required"]) == {"model_name", "version"}
    assert set(evaluate_schema["properties"]) == {"model_name", "version", "config_path"}


def test_worker_env_matches_the_cli_defaults():
    """A worker started with infra/prefect-worker.env runs flows like `lora-pipeline run` does."""
    from lora_pipeline.cli import _PROCESS_DEFAULTS

    env_file = Path(__file__).resolve().parents[1] / "infra" / "prefect-worker.env"
    pairs = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert pairs == _PROCESS_DEFAULTS
