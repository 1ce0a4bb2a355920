"""Registration task: the merged model (or adapter + base reference) into the MLflow model registry."""

from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig
from lora_pipeline.tracking import TrackingRun
from tasks.policy import HOUR, MINUTE, TRANSIENT_RETRIES, redacts_secrets


# Retried: the registry may be remote; registration is idempotent per run key, so a retry is safe.
@task(name="register", timeout_seconds=2 * HOUR, **TRANSIENT_RETRIES)
@redacts_secrets
def register(cfg: PipelineConfig, merged_dir: str | None, adapter_dir: str, run_dir: str,
             run: TrackingRun, run_key: str, tags: dict[str, str], store: str,
             description: str | None = None) -> dict[str, Any]:
    """Register this run's model; returns name, version, model URI and whether it was newly created."""
    return stages.register(cfg, Path(merged_dir) if merged_dir else None, Path(adapter_dir), Path(run_dir),
                           run, run_key, tags, store, description)


# Retried: setting aliases is idempotent.
@task(name="apply_aliases", timeout_seconds=10 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def apply_aliases(cfg: PipelineConfig, run: TrackingRun, version: str, gate_passed: bool) -> dict[str, Any]:
    """``candidate`` for a version that passed the gate, and ``champion`` too with ``registry.auto_promote``."""
    return stages.apply_aliases(cfg, run.tracking_uri, version, gate_passed)
