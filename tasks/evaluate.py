"""Evaluation tasks: the same function scores the base model, the candidate and the champion."""

from pathlib import Path
from typing import Any

from prefect import task

from lora_pipeline import evaluate_records, evaluate_stage
from lora_pipeline.config import PipelineConfig
from lora_pipeline.tracking import TrackingRun
from tasks.policy import CACHED, HOUR, MINUTE, TRANSIENT_RETRIES, redacts_secrets


@task(name="evaluate", task_run_name="evaluate-{label}", timeout_seconds=6 * HOUR, **CACHED)
@redacts_secrets
def evaluate(cfg: PipelineConfig, run_dir: str, label: str, adapter_dir: str | None = None) -> dict[str, Any]:
    """Task and regression metrics of the quantised base, the full-precision base or the candidate
    (``{"metrics", "execution"}``; an earlier run's, when it scored the same model on the same rows)."""
    return evaluate_records.evaluate(cfg, Path(run_dir), label, Path(adapter_dir) if adapter_dir else None)


@task(name="evaluate_champion", timeout_seconds=6 * HOUR, **TRANSIENT_RETRIES, **CACHED)
@redacts_secrets
def evaluate_champion(cfg: PipelineConfig, run_dir: str, run: TrackingRun, run_key: str,
                      base_fingerprint: str) -> dict[str, Any] | None:
    """Score the registry's current champion on this run's suites (None when there is none)."""
    return evaluate_records.evaluate_champion(cfg, Path(run_dir), run.tracking_uri, run_key, base_fingerprint)


@task(name="compare_models", timeout_seconds=10 * MINUTE, **CACHED)
@redacts_secrets
def compare_models(run_dir: str, results: dict[str, dict[str, float]], output_dir: str | None = None) -> dict[str, Any]:
    """JSON table and PNG bar chart of every scored model, and the quantisation cost, under ``run_dir/eval``
    (with ``output_dir``: an earlier run's, for the same scores)."""
    if output_dir is None:
        return evaluate_stage.compare_models(Path(run_dir), results)
    return evaluate_records.compare_models(Path(output_dir), Path(run_dir), results)


@task(name="evaluate_registered", task_run_name="evaluate-{label}", timeout_seconds=6 * HOUR, **TRANSIENT_RETRIES,
      **CACHED)
@redacts_secrets
def evaluate_registered(cfg: PipelineConfig, run_dir: str, run: TrackingRun, version: str,
                        label: str) -> dict[str, float]:
    """Score a registered version as registered (what serving loads) on this run's suites."""
    return evaluate_stage.evaluate_registered(cfg, Path(run_dir), run.tracking_uri, version, label)
