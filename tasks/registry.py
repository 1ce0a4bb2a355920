"""Registry tasks outside a training run: promotion, reading an alias, recording a re-evaluation."""

from typing import Any

from prefect import task

from lora_pipeline import promotion, registry
from lora_pipeline.run_request import load_run_config
from lora_pipeline.tracking import TrackingRun, resolve_tracking_uri
from tasks.policy import MINUTE, TRANSIENT_RETRIES, redacts_secrets


# Retried: the registry may be remote, and promoting the current champion again changes nothing.
@task(name="promote_version", timeout_seconds=10 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def promote_version(model_name: str, version: str, reason: str, force: bool, config_path: str | None,
                    by: str) -> dict[str, Any]:
    """Move ``champion`` to ``version`` and record who promoted it and why."""
    cfg = load_run_config(config_path, None)
    return promotion.promote(resolve_tracking_uri(cfg.mlflow, cfg.output_dir), model_name, version, force=force,
                             reason=reason, by=by)


@task(name="alias_version", timeout_seconds=5 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def alias_version(run: TrackingRun, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at (None when it is not set)."""
    return promotion.version_by_alias(run.tracking_uri, model_name, alias)


# Retried: setting tags is idempotent.
@task(name="tag_version", timeout_seconds=5 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def tag_version(run: TrackingRun, model_name: str, version: str, tags: dict[str, str]) -> None:
    """Set (masked) tags on one model version."""
    registry.set_version_tags(run.tracking_uri, model_name, version, tags)
