"""Training task: QLoRA on the formatted samples, metrics streamed to the run's MLflow run."""

from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import stages, tracking
from lora_pipeline.config import PipelineConfig


# One retry: training resumes from the run key's last intact checkpoint instead of starting over.
@task(name="train_qlora", retries=1, retry_delay_seconds=10)
def train_qlora(cfg: PipelineConfig, tokenized_path: str, run_dir: str, run_key: str,
                tracking_info: dict[str, str]) -> dict[str, Any]:
    """Train the LoRA adapter; returns the adapter directory and training metrics."""
    sink = partial(_log_step_metrics, tracking_info["tracking_uri"], tracking_info["run_id"])
    return stages.train(cfg, Path(tokenized_path), Path(run_dir), run_key, metrics_sink=sink)


def _log_step_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    tracking.log_metrics(tracking_uri, run_id, {f"train/{k}": v for k, v in metrics.items()}, step=step)
