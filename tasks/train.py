"""Training task: QLoRA on the formatted samples, metrics streamed to the run's MLflow run."""

from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig
from lora_pipeline.tracking import TrackingRun
from tasks.policy import CACHED, HOUR, TRANSIENT_RETRIES, redacts_secrets


# Retried (transient failures): training resumes from the run key's last intact checkpoint. A day: real models.
@task(name="train_qlora", timeout_seconds=24 * HOUR, **TRANSIENT_RETRIES, **CACHED)
@redacts_secrets
def train_qlora(cfg: PipelineConfig, tokenized_path: str, run_dir: str, run_key: str,
                run: TrackingRun) -> dict[str, Any]:
    """Train the LoRA adapter (on ``train.num_processes`` processes); returns its directory and metrics."""
    return stages.train(cfg, Path(tokenized_path), Path(run_dir), run_key, run)
