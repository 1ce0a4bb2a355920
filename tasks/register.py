"""Registration task: merged model + adapter into the MLflow model registry, idempotent per run key."""

from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig


# Retried: the registry may be remote; registration is idempotent per run key, so a retry is safe.
@task(name="register", retries=3, retry_delay_seconds=[2, 5, 15])
def register(cfg: PipelineConfig, merged_dir: str, adapter_dir: str, tracking_info: dict[str, str],
             run_key: str, tags: dict[str, str]) -> dict[str, Any]:
    """Register the merged model; returns name, version, model URI and whether it was newly created."""
    return stages.register(cfg, Path(merged_dir), Path(adapter_dir), tracking_info, run_key, tags)
