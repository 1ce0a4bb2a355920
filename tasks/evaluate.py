"""Evaluation task: the same function scores the base model and the candidate."""

from pathlib import Path

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig


@task(name="evaluate", task_run_name="evaluate-{label}")
def evaluate(cfg: PipelineConfig, run_dir: str, label: str, adapter_dir: str | None = None) -> dict[str, float]:
    """Task exact match, regression exact match/perplexity and stop rate of base or candidate."""
    return stages.evaluate(cfg, Path(run_dir), label, Path(adapter_dir) if adapter_dir else None)


@task(name="evaluate_champion", retries=2, retry_delay_seconds=[5, 15])
def evaluate_champion(cfg: PipelineConfig, run_dir: str, tracking_info: dict[str, str], run_key: str) -> dict | None:
    """Score the registry's current champion on this run's suites (None when there is none)."""
    return stages.evaluate_champion(cfg, Path(run_dir), tracking_info["tracking_uri"], run_key)


@task(name="compare_models")
def compare_models(run_dir: str, results: dict[str, dict[str, float]]) -> dict[str, str]:
    """JSON table and PNG bar chart of base vs candidate (vs champion) under ``run_dir/eval``."""
    return stages.compare_models(Path(run_dir), results)
