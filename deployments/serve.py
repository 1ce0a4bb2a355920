"""Serve the deployments declared in ``prefect.yaml`` from this process (no work pool or worker needed).

Usage: ``python -m deployments.serve`` (needs a Prefect API: ``prefect server start`` or Prefect Cloud).
``prefect deploy --all`` registers the same declarations against a work pool instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

REPO_ROOT = Path(__file__).resolve().parents[1]
DECLARATIONS = REPO_ROOT / "prefect.yaml"


def load_declarations(path: Path = DECLARATIONS) -> list[dict[str, Any]]:
    """The ``deployments`` of ``prefect.yaml``."""
    return yaml.safe_load(path.read_text())["deployments"]


def build_deployments(path: Path = DECLARATIONS) -> list[Any]:
    """One ``RunnerDeployment`` per declaration (entrypoint, schedules and parameters taken as data)."""
    deployments = []
    for item in load_declarations(path):
        flow = load_flow_from_entrypoint(str(REPO_ROOT / item["entrypoint"]))
        # ``prefect.schedules.Cron`` carries the timezone; ``to_deployment(timezone=...)`` is gone in Prefect 3.9.
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in item.get("schedules", [])] or None
        deployments.append(flow.to_deployment(
            name=item["name"], description=item.get("description"), parameters=item.get("parameters", {}),
            schedules=schedules, tags=item.get("tags"),
        ))
    return deployments


if __name__ == "__main__":
    from prefect import serve

    serve(*build_deployments())
