"""MLflow tasks: open the pipeline run, log small results, close it."""

from pathlib import Path

from prefect import task

from lora_pipeline import stages, tracking
from lora_pipeline.config import PipelineConfig
from tasks.policy import CACHED, MINUTE, TRANSIENT_RETRIES, redacts_secrets


# Retried: a remote tracking server can be briefly unreachable.
@task(name="open_tracking_run", timeout_seconds=10 * MINUTE, **TRANSIENT_RETRIES, **CACHED)
@redacts_secrets
def open_tracking_run(cfg: PipelineConfig, run_dir: str, flow_run_id: str) -> tracking.TrackingRun:
    """Create the run's MLflow run; returns where it lives and its id."""
    return stages.open_tracking(cfg, Path(run_dir), flow_run_id)


@task(name="log_results", timeout_seconds=30 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def log_results(run: tracking.TrackingRun, metrics: dict[str, float], tags: dict[str, str],
                artifacts_dir: str | None = None) -> None:
    """Log final metrics, tags and (optionally) a directory of small artefacts to the MLflow run."""
    uri, run_id = run.tracking_uri, run.run_id
    tracking.log_metrics(uri, run_id, metrics)
    tracking.set_tags(uri, run_id, tags)
    if artifacts_dir:
        tracking.log_artifacts(uri, run_id, Path(artifacts_dir))


@task(name="log_data_report", timeout_seconds=30 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def log_data_report(run: tracking.TrackingRun, data_dir: str) -> list[str]:
    """Log the data stage's report, GX result, quarantine and Data Docs to the MLflow run."""
    return stages.log_data_artifacts(run, Path(data_dir))


@task(name="close_tracking_run", timeout_seconds=10 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def close_tracking_run(run: tracking.TrackingRun, status: str) -> None:
    """Mark the MLflow run FINISHED or FAILED."""
    tracking.end_run(run.tracking_uri, run.run_id, status)
