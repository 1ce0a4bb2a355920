"""Data stage tasks: validate/clean the rows, then format them into training samples."""

from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig
from tasks.policy import CACHED, HOUR, redacts_secrets


# No retries: a data failure is deterministic, retrying would only repeat it.
@task(name="validate_data", timeout_seconds=2 * HOUR, **CACHED)
@redacts_secrets
def validate_data(cfg: PipelineConfig, run_dir: str) -> dict[str, Any]:
    """GX-validate and clean the training set; raises with the failed rules and first bad rows."""
    return stages.validate_data(cfg, Path(run_dir))


@task(name="format_prompts", timeout_seconds=2 * HOUR, **CACHED)
@redacts_secrets
def format_prompts(cfg: PipelineConfig, clean_path: str, run_dir: str) -> dict[str, Any]:
    """Chat-template and tokenize the clean rows, proving each answer ends in a trained EOS."""
    return stages.format_prompts(cfg, Path(clean_path), Path(run_dir))
