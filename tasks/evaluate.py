"""Evaluation task: the same function scores the base model and the candidate."""

from pathlib import Path

from prefect import task

from lora_pipeline import stages
from lora_pipeline.config import PipelineConfig


@task(name="evaluate", task_run_name="evaluate-{label}")
def evaluate(cfg: PipelineConfig, run_dir: str, label: str, adapter_dir: str | None = None) -> dict[str, float]:
    """Task exact match, regression exact match/perplexity and stop rate of base or candidate."""
    return stages.evaluate(cfg, Path(run_dir), label, Path(adapter_dir) if adapter_dir else None)
