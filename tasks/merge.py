"""Merge task: adapter into the de-quantised base, with a logit parity check."""

from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig
from tasks.policy import CACHED, HOUR, redacts_secrets


@task(name="merge", timeout_seconds=4 * HOUR, **CACHED)
@redacts_secrets
def merge(cfg: PipelineConfig, adapter_dir: str, run_dir: str) -> dict[str, Any]:
    """Merge and save the standalone model; fails (nothing written) if parity is broken."""
    return stages.merge(cfg, Path(adapter_dir), Path(run_dir))
