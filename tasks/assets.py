"""Resolve the model and data locations (build the offline demo world, convert a GGUF base, on first use)."""

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig
from tasks.policy import CACHED, HOUR, TRANSIENT_RETRIES, redacts_secrets


# Retried: a hub download of a real base model can fail transiently. Hours: a download or a GGUF conversion.
@task(name="resolve_assets", timeout_seconds=2 * HOUR, **TRANSIENT_RETRIES, **CACHED)
@redacts_secrets
def resolve_assets(cfg: PipelineConfig) -> stages.ResolvedAssets:
    """Return the config with every input made concrete, and the base weights' fingerprint."""
    return stages.resolve_assets(cfg)
