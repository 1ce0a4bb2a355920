"""The gate report as Prefect artifacts (Markdown and a table in the flow run's Artifacts tab), and the
model version's description for the MLflow UI."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lora_pipeline import reports, tracking
from tasks.policy import MINUTE, TRANSIENT_RETRIES, redacts_secrets


# Retried: it reads the run's experiment from a tracking server that may be briefly unreachable.
@task(name="publish_gate_report", timeout_seconds=10 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def publish_gate_report(model_name: str, run: tracking.TrackingRun, gate: dict[str, Any],
                        results: dict[str, dict[str, float]], task_metric: str, kind: str = "gate",
                        version: str | None = None) -> dict[str, Any]:
    """Publish the gate decision and the comparison table (artifact keys ``<kind>-<model>`` and
    ``<kind>-comparison-<model>``: ``gate`` for a training run, ``rescore`` for a re-evaluation of ``version``);
    returns the MLflow run link and the description the registered version will carry."""
    url = tracking.run_url(run.tracking_uri, run.run_id)
    verdict = "passed" if gate["passed"] else "rejected"
    create_markdown_artifact(key=reports.artifact_key(kind, model_name),
                             markdown=reports.gate_report(model_name, gate, results, url, version),
                             description=f"Gate {verdict} for {model_name}")
    create_table_artifact(key=reports.artifact_key(kind, "comparison", model_name),
                          table=reports.comparison_rows(results),
                          description=f"Evaluation of every scored model for {model_name}")
    return {"run_url": url, "verdict": verdict,
            "description": reports.version_description(gate, results, run.run_id, url, task_metric)}
