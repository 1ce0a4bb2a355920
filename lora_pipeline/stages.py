"""Stage entry points: one function per pipeline stage, each taking the resolved config and paths.

Prefect tasks wrap exactly one of these; they exchange paths, hashes and small metric dicts, never
models or datasets, so every stage can be retried or re-run alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_pipeline.chat_templates import turn_markers
from lora_pipeline.config import BUILTIN_DEMO, PipelineConfig
from lora_pipeline.data import ValidationResult, read_messages, validate_dataset
from lora_pipeline.demo_world import ensure_demo_world
from lora_pipeline.evaluation import (
    EvalSuites,
    comparison_table,
    evaluate_model,
    write_comparison_chart,
    write_metrics,
)
from lora_pipeline.formatting import format_dataset
from lora_pipeline.merge import merge_adapter
from lora_pipeline.modeling import detect_device, load_base_model, load_tokenizer
from lora_pipeline.training import LOSS_CURVE_FILENAME, train_qlora

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage refused to continue; the message names the rule and where to look."""


def resolve_assets(cfg: PipelineConfig) -> PipelineConfig:
    """Replace every ``builtin:demo`` path by the cached demo world (built on first use)."""
    builtin = {
        "model": cfg.model.name_or_path == BUILTIN_DEMO,
        "data": cfg.data.path == BUILTIN_DEMO,
        "eval_path": cfg.data.eval_path == BUILTIN_DEMO,
        "qa": cfg.eval.regression_qa_path == BUILTIN_DEMO,
        "text": cfg.eval.regression_text_path == BUILTIN_DEMO,
    }
    if not any(builtin.values()):
        return cfg
    world = ensure_demo_world(cfg.demo, cfg.output_dir / "cache" / "demo-world", log=logger.info)
    model = cfg.model.model_copy(update={"name_or_path": str(world.model_dir)} if builtin["model"] else {})
    data = cfg.data.model_copy(update={
        **({"path": str(world.train_path)} if builtin["data"] else {}),
        **({"eval_path": str(world.eval_path)} if builtin["eval_path"] else {}),
    })
    evaluation = cfg.eval.model_copy(update={
        **({"regression_qa_path": str(world.regression_qa_path)} if builtin["qa"] else {}),
        **({"regression_text_path": str(world.regression_text_path)} if builtin["text"] else {}),
    })
    return cfg.model_copy(update={"model": model, "data": data, "eval": evaluation})


def check_data(cfg: PipelineConfig, out_dir: Path) -> ValidationResult:
    """Clean, quarantine and GX-validate the training rows into ``out_dir`` (never raises on bad rows).

    The training tokenizer (with its chat template) templates and truncates every row as training will,
    and held-out eval/regression files are used to decontaminate the training set.
    """
    tokenizer = load_tokenizer(cfg.model)
    held_out = [Path(p) for p in (cfg.data.eval_path, cfg.eval.regression_qa_path) if p]
    return validate_dataset(
        cfg.data,
        cfg.data.path,
        out_dir,
        special_tokens=[*tokenizer.all_special_tokens, *turn_markers(cfg.model.chat_template)],
        decontaminate_against=[p for p in held_out if p.is_file()],
        tokenizer=tokenizer,
    )


def validate_data(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """The flow's data stage: :func:`check_data` under ``run_dir/data``; stops the run if it fails."""
    result = check_data(cfg, run_dir / "data")
    if not result.success:
        raise StageError("data validation failed:\n  " + "\n  ".join(result.failures)
                         + f"\nreport: {result.report_path}\nquarantine: {result.quarantine_path}")
    return {
        "clean_path": str(result.clean_path),
        "data_hash": result.data_hash,
        "n_input": result.n_input,
        "n_clean": result.n_clean,
        "n_quarantined": result.n_quarantined,
        "reason_counts": result.reason_counts,
        "report_path": str(result.report_path),
    }


#: What of the data stage's output goes to MLflow: the evidence, not the (possibly large) clean rows.
DATA_ARTIFACTS = ("report.json", "gx_validation_result.json", "quarantine.jsonl", "data_docs")


def log_data_artifacts(tracking_info: dict[str, str], data_dir: Path) -> list[str]:
    """Log the data report, GX result, quarantine and Data Docs (those that exist) under ``data/``."""
    from lora_pipeline import tracking

    logged = []
    for name in DATA_ARTIFACTS:
        path = data_dir / name
        if path.exists():
            artifact_path = "data/" + name if path.is_dir() else "data"
            tracking.log_artifacts(tracking_info["tracking_uri"], tracking_info["run_id"], path, artifact_path)
            logged.append(name)
    return logged


def format_prompts(cfg: PipelineConfig, clean_path: Path, run_dir: Path) -> dict[str, Any]:
    """Apply the chat template, mask non-assistant tokens and prove every answer ends in a trained EOS."""
    tokenizer = load_tokenizer(cfg.model)
    out_dir = run_dir / "formatted"
    report = format_dataset(tokenizer, clean_path, out_dir / "tokenized.jsonl", cfg.data.max_length)
    (out_dir / "format_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if report.n_written < cfg.data.min_rows:
        raise StageError(
            f"only {report.n_written} rows keep trainable tokens after truncation to data.max_length="
            f"{cfg.data.max_length} (data.min_rows={cfg.data.min_rows}); first rejected lines of "
            f"{clean_path}: {report.rejected_lines[:5]}"
        )
    # The flow passes small dicts: the full list of rejected lines stays in format_report.json.
    summary = {k: v for k, v in report.to_dict().items() if k != "rejected_lines"}
    return {"tokenized_path": str(out_dir / "tokenized.jsonl"), "n_rejected": len(report.rejected_lines), **summary}


def load_eval_suites(cfg: PipelineConfig) -> EvalSuites:
    """Held-out task rows, regression Q/A and regression text, each capped at ``eval.max_samples``."""
    limit, suites = cfg.eval.max_samples, cfg.eval.suites
    task = read_messages(cfg.data.eval_path, cfg.data.format)[:limit] if cfg.data.eval_path else []
    qa_path, text_path = cfg.eval.regression_qa_path, cfg.eval.regression_text_path
    with_regression = "regression" in suites
    qa = read_messages(qa_path, "messages")[:limit] if qa_path and with_regression else []
    text = [row["text"] for row in read_messages(text_path, "text")[:limit]] if text_path and with_regression else []
    lm_eval_tasks = tuple(s.removeprefix("lm_eval:") for s in suites if s.startswith("lm_eval:"))
    # The task rows are loaded even without the `task` suite: merge parity and the registry's input
    # example use them. Scoring them is what the suite switches.
    return EvalSuites(task=task, regression_qa=qa, regression_text=text, lm_eval_tasks=lm_eval_tasks,
                      lm_eval_limit=limit, score_task="task" in suites)


def evaluate(cfg: PipelineConfig, run_dir: Path, label: str, adapter_dir: Path | None = None) -> dict[str, float]:
    """Score the base model (``adapter_dir`` None, full precision: what users would otherwise serve) or
    the candidate (quantised base + adapter, exactly as trained) with the same function."""
    from peft import PeftModel  # local: only the candidate path needs it

    device = detect_device()
    tokenizer = load_tokenizer(cfg.model)
    if adapter_dir is None:
        model = load_base_model(cfg.model, cfg.quant, device, quantize=False)
    else:
        model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.quant, device), str(adapter_dir)).eval()
    return _score(cfg, model, tokenizer, run_dir, label)


def _score(cfg: PipelineConfig, model: Any, tokenizer: Any, run_dir: Path, label: str) -> dict[str, float]:
    skipped: list[str] = []
    metrics = evaluate_model(
        model, tokenizer, load_eval_suites(cfg),
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, max_length=cfg.data.max_length,
        generations_path=run_dir / "eval" / f"{label}_generations.jsonl", skipped=skipped,
    )
    write_metrics(metrics, run_dir / "eval" / f"{label}.json")
    for reason in skipped:
        logger.warning("%s: %s", label, reason)
    if skipped:
        (run_dir / "eval" / f"{label}_skipped.json").write_text(json.dumps(skipped, indent=2))
    return metrics


def evaluate_champion(cfg: PipelineConfig, run_dir: Path, tracking_uri: str, run_key: str) -> dict[str, Any] | None:
    """Score the registered ``champion`` on this run's suites, with the same function as the candidate.

    Returns:
        ``{"version", "run_key", "metrics"}``, or None when there is no champion yet or the champion
        is this very training (same run key: comparing it with itself says nothing).
    """
    import shutil

    from lora_pipeline.registry import CHAMPION_ALIAS, RUN_KEY_TAG, load_text_generation, mlflow_client, version_by_alias

    name = cfg.registry.model_name
    version = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    if version is None:
        return None
    champion_key = mlflow_client(tracking_uri).get_model_version(name, version).tags.get(RUN_KEY_TAG, "")
    if champion_key == run_key:
        return {"version": version, "run_key": champion_key, "metrics": None}
    download = run_dir / "champion_model"
    download.mkdir(parents=True, exist_ok=True)
    try:
        pipe = load_text_generation(f"models:/{name}/{version}", tracking_uri, dst_dir=download)
        metrics = _score(cfg, pipe.model, pipe.tokenizer, run_dir, "champion")
    finally:  # a full model copy; the registry keeps the original
        shutil.rmtree(download, ignore_errors=True)
    return {"version": version, "run_key": champion_key, "metrics": metrics}


def compare_models(run_dir: Path, results: dict[str, dict[str, float]]) -> dict[str, str]:
    """Write the base / candidate / champion comparison as ``eval/comparison.json`` and ``comparison.png``."""
    table_path = run_dir / "eval" / "comparison.json"
    table_path.write_text(json.dumps(comparison_table(results), indent=2, sort_keys=True))
    chart_path = write_comparison_chart(results, run_dir / "eval" / "comparison.png")
    return {"table": str(table_path), "chart": str(chart_path)}


def apply_aliases(cfg: PipelineConfig, tracking_uri: str, version: str, gate_passed: bool) -> dict[str, Any]:
    """After registration: a passing version becomes ``candidate``, and ``champion`` with
    ``registry.auto_promote``; a failing one gets no alias. Returns the model's aliases afterwards."""
    from lora_pipeline import registry

    name = cfg.registry.model_name
    promoted = False
    if gate_passed:
        registry.set_candidate(tracking_uri, name, version)
        if cfg.registry.auto_promote:
            registry.promote(tracking_uri, name, version)
            promoted = True
    return {"aliases": registry.aliases(tracking_uri, name), "promoted": promoted}


def train(cfg: PipelineConfig, tokenized_path: Path, run_dir: Path, run_key: str,
          tracking_info: dict[str, str] | None = None) -> dict[str, Any]:
    """QLoRA-train the adapter; returns its directory and the training metrics.

    Checkpoints live in ``output_dir/checkpoints/<run_key>``: a Prefect retry, or a new run of the same
    config on the same data, resumes from the last intact one; any change of either starts afresh.
    ``train.num_processes > 1`` launches the ranks with torchrun (see :mod:`lora_pipeline.distributed`);
    per-step metrics go to the MLflow run in ``tracking_info`` (from rank 0 only).
    """
    from contextlib import nullcontext
    from functools import partial

    from lora_pipeline import tracking
    from lora_pipeline.distributed import launch_training

    checkpoint_dir = cfg.output_dir / "checkpoints" / run_key
    monitor = tracking.system_metrics(tracking_info["tracking_uri"], tracking_info["run_id"],
                                      cfg.mlflow.system_metrics_interval) if tracking_info else nullcontext()
    with monitor:
        if cfg.train.num_processes > 1:
            trained = launch_training(cfg, tokenized_path, run_dir, checkpoint_dir, tracking_info)
        else:
            sink = partial(tracking.log_step_metrics, tracking_info["tracking_uri"], tracking_info["run_id"]) \
                if tracking_info else None
            result = train_qlora(cfg, tokenized_path, run_dir, metrics_sink=sink, checkpoint_dir=checkpoint_dir)
            trained = {"adapter_dir": str(result.adapter_dir), "metrics": result.metrics}
    curve = run_dir / "train" / LOSS_CURVE_FILENAME
    if tracking_info and curve.is_file():
        tracking.log_artifacts(tracking_info["tracking_uri"], tracking_info["run_id"], curve, "train")
    return trained


def merge(cfg: PipelineConfig, adapter_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Merge the adapter into the de-quantised base under ``run_dir/merged`` and check logit parity."""
    samples = load_eval_suites(cfg).task[: cfg.merge.parity_samples]
    report = merge_adapter(cfg, adapter_dir, run_dir / "merged", samples)
    return report.to_dict()


def open_tracking(cfg: PipelineConfig, run_dir: Path, flow_run_id: str) -> dict[str, str]:
    """Create this pipeline run's single MLflow run and log the flattened config (secrets masked)."""
    from lora_pipeline import tracking

    uri = tracking.resolve_tracking_uri(cfg.mlflow, cfg.output_dir)
    run_id = tracking.start_pipeline_run(
        uri, cfg.mlflow.experiment_name, cfg.output_dir / "mlartifacts", run_name=run_dir.name,
        tags={"flow_run_id": flow_run_id, "config_hash": cfg.config_hash(), "run_dir": str(run_dir)},
    )
    tracking.log_params(uri, run_id, tracking.flatten_config(cfg.model_dump(mode="json")))
    return {"tracking_uri": uri, "run_id": run_id}


def register(
    cfg: PipelineConfig,
    merged_dir: Path,
    adapter_dir: Path,
    tracking_info: dict[str, str],
    run_key: str,
    tags: dict[str, str],
) -> dict[str, Any]:
    """Log the merged model (transformers flavor) and its adapter to the run and register a version."""
    from lora_pipeline.registry import register_model

    example_rows = load_eval_suites(cfg).task[:1]
    input_example = [m for m in example_rows[0]["messages"][:-1]] if example_rows else "Hello"
    version = register_model(
        tracking_uri=tracking_info["tracking_uri"],
        run_id=tracking_info["run_id"],
        model_dir=merged_dir,
        registry_cfg=cfg.registry,
        run_key=run_key,
        tags=tags,
        input_example=input_example,
        adapter_dir=adapter_dir,
    )
    return {"name": version.name, "version": version.version, "model_uri": version.model_uri, "created": version.created}
