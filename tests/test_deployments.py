"""Deployments are declared as data and build into Prefect deployments of the real flow."""

from deployments.serve import build_deployments, load_declarations


def test_declarations_point_at_existing_configs():
    from pathlib import Path

    for item in load_declarations():
        assert item["entrypoint"] == "flows/finetune.py:finetune"
        assert Path(item["parameters"]["config_path"]).is_file()


def test_deployments_build_with_schedule_and_parameters():
    deployments = {d.name: d for d in build_deployments()}
    weekly = deployments["weekly-retrain"]
    assert weekly.schedules and weekly.schedules[0].schedule.cron == "0 3 * * 1"
    assert weekly.schedules[0].schedule.timezone == "UTC"
    assert weekly.parameters["config_path"].endswith("configs/demo.yaml")
    assert deployments["adhoc"].schedules in (None, [])


def test_worker_env_matches_the_cli_defaults():
    """A worker started with infra/prefect-worker.env runs flows like `lora-pipeline run` does."""
    from pathlib import Path

    from lora_pipeline.cli import _PROCESS_DEFAULTS

    env_file = Path(__file__).resolve().parents[1] / "infra" / "prefect-worker.env"
    pairs = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert pairs == _PROCESS_DEFAULTS
