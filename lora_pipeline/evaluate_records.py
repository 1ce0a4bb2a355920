"""The evaluate stage as a training run calls it: :mod:`lora_pipeline.evaluate_stage`'s scoring, or the record
of the same scoring left by an earlier run (:mod:`lora_pipeline.reuse`).

A model's scores are reused only when the model is the same (base files, quantisation, the adapter's
bytes; for the champion, the same registered version), the rows scored are the same (task rows, the
regression Q/A or the base's references, general text) and so are the ``eval`` settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_pipeline import evaluate_stage, stage_inputs
from lora_pipeline.config import PipelineConfig
from lora_pipeline.reuse import EXECUTION, execution, reused_or_computed
from lora_pipeline.suites import references_path

_OUTPUT_SUFFIXES = (".json", "_generations.jsonl", "_skipped.json")


def evaluate(cfg: PipelineConfig, run_dir: Path, label: str, adapter_dir: Path | None = None) -> dict[str, Any]:
    """:func:`lora_pipeline.evaluate_stage.evaluate`, or its record: ``{"metrics", "execution"}``.

    Its files (``eval/<label>*``; for the base, the regression references its answers became) are recorded.
    """
    def compute() -> dict[str, Any]:
        timings: dict[str, float] = {}
        metrics = evaluate_stage.evaluate(cfg, run_dir, label, adapter_dir, timings)
        return {"metrics": metrics, EXECUTION: execution(timings.get("compute_seconds", 0.0))}

    outputs = [run_dir / "eval" / f"{label}{suffix}" for suffix in _OUTPUT_SUFFIXES]
    if label == evaluate_stage.BASE:
        outputs.append(references_path(run_dir))
    return reused_or_computed(cfg.output_dir, f"evaluate-{label}",
                              stage_inputs.evaluate_inputs(cfg, run_dir, label, adapter_dir), run_dir, compute, outputs)


def champion_identity(cfg: PipelineConfig, tracking_uri: str, base_fingerprint: str) -> dict[str, Any] | None:
    """The registered ``champion``: registry, name, version and the lineage tags that decide how it is scored
    (None when there is no champion)."""
    from lora_pipeline.promotion import CHAMPION_ALIAS, version_by_alias
    from lora_pipeline.redaction import mask_secrets
    from lora_pipeline.registry import RUN_KEY_TAG, mlflow_client

    name = cfg.registry.model_name
    version = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    if version is None:
        return None
    tags = mlflow_client(tracking_uri).get_model_version(name, version).tags
    return {"registry": mask_secrets(tracking_uri), "name": name, "version": version,
            **{key: tags.get(key, "") for key in (RUN_KEY_TAG, "base_fingerprint", "adapter_uri", "store")},
            "same_base": tags.get("base_fingerprint") == base_fingerprint}


class _ChampionMoved(Exception):
    """The champion alias moved while it was scored: the result stands, but is not recorded as the old one's."""

    def __init__(self, result: dict[str, Any] | None) -> None:
        super().__init__("the champion alias moved while it was scored")
        self.result = result


def evaluate_champion(cfg: PipelineConfig, run_dir: Path, tracking_uri: str, run_key: str,
                      base_fingerprint: str) -> dict[str, Any] | None:
    """:func:`lora_pipeline.evaluate_stage.evaluate_champion`, or the record of the same champion version
    scored on the same suites; the result gains ``execution`` when a champion was scored (not when there is
    none, or it is this very training)."""
    from lora_pipeline.registry import RUN_KEY_TAG

    champion = champion_identity(cfg, tracking_uri, base_fingerprint)
    if champion is None or champion[RUN_KEY_TAG] == run_key:  # none, or this very training: nothing to score
        return evaluate_stage.evaluate_champion(cfg, run_dir, tracking_uri, run_key, base_fingerprint)

    def compute() -> dict[str, Any]:
        timings: dict[str, float] = {}
        result = evaluate_stage.evaluate_champion(cfg, run_dir, tracking_uri, run_key, base_fingerprint, timings)
        scored = None if result is None else {**result, EXECUTION: execution(timings.get("compute_seconds", 0.0))}
        if scored is None or scored["version"] != champion["version"]:
            raise _ChampionMoved(scored)
        return scored

    outputs = [run_dir / "eval" / f"{evaluate_stage.CHAMPION}{suffix}" for suffix in _OUTPUT_SUFFIXES]
    try:
        return reused_or_computed(cfg.output_dir, "evaluate-champion",
                                  stage_inputs.champion_inputs(cfg, run_dir, champion), run_dir, compute, outputs)
    except _ChampionMoved as moved:
        return moved.result


def compare_models(output_dir: Path, run_dir: Path, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """:func:`lora_pipeline.evaluate_stage.compare_models`, or the record of the same scores' table and chart
    (drawing the chart is most of an identical re-run's evaluate stage)."""
    def compute() -> dict[str, Any]:
        return {**evaluate_stage.compare_models(run_dir, results), EXECUTION: execution()}

    outputs = [run_dir / "eval" / name for name in ("comparison.json", "comparison.png")]
    compared = reused_or_computed(output_dir, "compare_models", {"results": results}, run_dir, compute, outputs)
    return {key: value for key, value in compared.items() if key != EXECUTION}
