"""Build the Prefect deployments declared in ``deployments.yaml`` and serve them from this process.

Usage: ``python -m deployments.serve`` (needs a Prefect API: ``prefect server start`` or Prefect Cloud).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect.schedules import Cron

from flows.finetune import finetune

DECLARATIONS = Path(__file__).with_name("deployments.yaml")
REPO_ROOT = Path(__file__).resolve().parents[1]
FLOWS = {"flows/finetune.py:finetune": finetune}


def load_declarations(path: Path = DECLARATIONS) -> list[dict[str, Any]]:
    """The deployment declarations, with config paths made absolute against the repository root."""
    declarations = yaml.safe_load(path.read_text())
    for item in declarations:
        params = item.setdefault("parameters", {})
        if params.get("config_path"):
            params["config_path"] = str(REPO_ROOT / params["config_path"])
    return declarations


def build_deployments(path: Path = DECLARATIONS) -> list[Any]:
    """One ``RunnerDeployment`` per declaration (schedules and parameters taken as data)."""
    deployments = []
    for item in load_declarations(path):
        flow = FLOWS[item["entrypoint"]]
        # ``prefect.schedules.Cron`` carries the timezone; ``to_deployment(timezone=...)`` is gone in Prefect 3.9.
        schedules = [Cron(item["cron"], timezone=item.get("timezone", "UTC"))] if item.get("cron") else None
        deployments.append(flow.to_deployment(
            name=item["name"], description=item.get("description"), parameters=item["parameters"], schedules=schedules,
        ))
    return deployments


if __name__ == "__main__":
    from prefect import serve

    serve(*build_deployments())
