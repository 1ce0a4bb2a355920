"""Resolve the model and data locations (build the offline demo world, convert a GGUF base, on first use)."""

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig


# Retried: a hub download of a real base model can fail transiently.
@task(name="resolve_assets", retries=2, retry_delay_seconds=[5, 15])
def resolve_assets(cfg: PipelineConfig) -> stages.ResolvedAssets:
    """Return the config with every input made concrete, and the base weights' fingerprint."""
    return stages.resolve_assets(cfg)
