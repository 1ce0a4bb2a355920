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
    assert weekly.parameters["config_path"].endswith("configs/demo.yaml")
    assert deployments["adhoc"].schedules in (None, [])
