"""The evaluate stage: the base, the candidate and the registry's champion, scored by one function.

A fair comparison: the base is scored as the *quantised* base the candidate was trained on, and the
champion (when it was trained on the same base) as its adapter on that same quantised base, so the
quantisation error is never counted as the candidate's forgetting or gain. The full-precision base
(what a user would otherwise serve) is scored separately, and its difference to the quantised base
reported as the quantisation cost.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_pipeline.base_model import model_stop_ids
from lora_pipeline.config import BASE_ANSWERS, PipelineConfig
from lora_pipeline.formatting import stop_token_ids
from lora_pipeline.suites import load_eval_suites, references_path, write_references

# The scoring and model-loading modules (torch, transformers, peft, matplotlib) are imported where a model is
# scored: a re-run whose evaluations are all reused (lora_pipeline.evaluate_records) never imports them.

logger = logging.getLogger(__name__)

#: Labels of the models one run scores (``eval/<label>.json``); the gate compares BASE and CANDIDATE.
BASE, FULL_PRECISION_BASE, CANDIDATE, CHAMPION = "base", "base_full_precision", "candidate", "champion"
#: Metrics whose full-precision minus quantised difference is reported as the quantisation cost.
_COST_METRICS = ("task_exact_match", "task_perplexity", "regression_exact_match", "regression_perplexity")


def evaluate(cfg: PipelineConfig, run_dir: Path, label: str, adapter_dir: Path | None = None,
             timings: dict[str, float] | None = None) -> dict[str, float]:
    """Score one model of this run under ``label`` and return its metrics.

    ``base``: the base quantised as for training (``quant``); ``base_full_precision``: the base
    without quantisation; ``candidate``: the quantised base + ``adapter_dir``, exactly as trained.
    With ``eval.regression_qa_path: base_answers`` the ``base`` must be scored first: its answers
    become the regression references. ``timings`` receives ``compute_seconds`` (see :func:`score`).
    """
    from peft import PeftModel

    from lora_pipeline.modeling import detect_device, load_base_model, load_tokenizer

    device = detect_device()
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, cfg.quant, device, quantize=label != FULL_PRECISION_BASE)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    stops = model_stop_ids(cfg.model.name_or_path, cfg.model.revision, tokenizer)
    return score(cfg, model, tokenizer, stops, run_dir, label, timings)


def score(cfg: PipelineConfig, model: Any, tokenizer: Any, stop_ids: list[int], run_dir: Path,
          label: str, timings: dict[str, float] | None = None) -> dict[str, float]:
    """Every suite of this run on ``model``; writes ``eval/<label>.json`` and its generations.

    ``timings``, when given, receives ``compute_seconds``: generation and scoring only (not loading the
    model or the suites, not writing the metrics), added to what it holds.
    """
    from lora_pipeline.evaluation import evaluate_model, generate_answers, write_metrics

    notes: list[str] = []
    suites = load_eval_suites(cfg, run_dir, has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                              notes=notes)
    base_answers = None
    started = time.perf_counter()
    if label == BASE and cfg.eval.regression_qa_path == BASE_ANSWERS and suites.regression_qa \
            and not references_path(run_dir).is_file():
        # No references yet: the base's own greedy answers become them (base = 1.0 by construction).
        base_answers = generate_answers(model, tokenizer, suites.regression_qa, cfg.eval.max_new_tokens,
                                        cfg.eval.batch_size, stop_ids)
        suites = replace(suites, regression_qa=write_references(suites.regression_qa, base_answers, run_dir))
    metrics = evaluate_model(
        model, tokenizer, suites, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        max_length=cfg.data.max_length, stop_ids=stop_ids, match=cfg.eval.match, regression_answers=base_answers,
        generations_path=run_dir / "eval" / f"{label}_generations.jsonl", skipped=notes,
    )
    if timings is not None:
        timings["compute_seconds"] = timings.get("compute_seconds", 0.0) + time.perf_counter() - started
    write_metrics(metrics, run_dir / "eval" / f"{label}.json")
    for note in notes:
        logger.warning("%s: %s", label, note)
    if notes:
        (run_dir / "eval" / f"{label}_skipped.json").write_text(json.dumps(notes, indent=2))
    return metrics


def describe_suites(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    """What each suite is, in words, so a reader knows what the figures measure; also written to
    ``eval/suites.json`` (logged to MLflow with the other evaluation files)."""
    qa = cfg.eval.regression_qa_path
    description = {
        "task": str(cfg.data.eval_path) if cfg.data.eval_path else
        f"held-out split of data.path ({cfg.data.eval_fraction:.0%} of its rows, by prompt hash)",
        "regression_qa": "the base model's own greedy answers to the package's general prompts: regression exact "
        "match measures how far the candidate's behaviour drifted from the base (1.0 for the base by "
        "construction)" if qa == BASE_ANSWERS else str(qa),
        "regression_text": str(cfg.eval.regression_text_path),
        "base": "the base as quantised for training (quant.*); base_full_precision is the unquantised base",
    }
    path = run_dir / "eval" / "suites.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(description, indent=2))
    return description


def evaluate_champion(cfg: PipelineConfig, run_dir: Path, tracking_uri: str, run_key: str,
                      base_fingerprint: str, timings: dict[str, float] | None = None) -> dict[str, Any] | None:
    """Score the registered ``champion`` on this run's suites, with the same function as the candidate.

    A champion trained on the same base (its ``base_fingerprint`` tag) is scored as its adapter on
    this run's quantised base, like the candidate; one trained on another base as it was registered.

    Returns:
        ``{"version", "run_key", "metrics", "scored_as"}``, or None when there is no champion yet;
        ``metrics`` is None when the champion is this very training (same run key).
    """
    from mlflow.artifacts import download_artifacts

    from lora_pipeline.promotion import CHAMPION_ALIAS, version_by_alias
    from lora_pipeline.registry import RUN_KEY_TAG, mlflow_client

    name = cfg.registry.model_name
    version = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    if version is None:
        return None
    tags = mlflow_client(tracking_uri).get_model_version(name, version).tags
    if tags.get(RUN_KEY_TAG, "") == run_key:
        return {"version": version, "run_key": run_key, "metrics": None, "scored_as": "this same training"}
    download = run_dir / "champion_model"
    download.mkdir(parents=True, exist_ok=True)
    try:
        if tags.get("base_fingerprint") == base_fingerprint and tags.get("adapter_uri"):
            from peft import PeftModel

            from lora_pipeline.modeling import detect_device, load_base_model, load_tokenizer

            adapter = Path(download_artifacts(artifact_uri=tags["adapter_uri"], dst_path=str(download),
                                              tracking_uri=tracking_uri))
            tokenizer = load_tokenizer(cfg.model, adapter)  # the champion's own template
            base = load_base_model(cfg.model, cfg.quant, detect_device())
            model = PeftModel.from_pretrained(base, str(adapter)).eval()
            stops = model_stop_ids(cfg.model.name_or_path, cfg.model.revision, tokenizer)
            scored_as = "its adapter on this run's quantised base"
            metrics = score(cfg, model, tokenizer, stops, run_dir, CHAMPION, timings)
        else:
            metrics = evaluate_registered(cfg, run_dir, tracking_uri, version, CHAMPION, timings)
            scored_as = "as registered (trained on another base)"
    finally:  # a model copy; the registry keeps the original
        shutil.rmtree(download, ignore_errors=True)
    return {"version": version, "run_key": tags.get(RUN_KEY_TAG, ""), "metrics": metrics, "scored_as": scored_as}


def evaluate_registered(cfg: PipelineConfig, run_dir: Path, tracking_uri: str, version: str,
                        label: str, timings: dict[str, float] | None = None) -> dict[str, float]:
    """Score ``version`` of ``registry.model_name`` as it was registered (the merged model, or its adapter on
    its base: what serving loads), with its registered stop set, under ``label``."""
    from lora_pipeline.loading import load_registered_model

    download = run_dir / f"{label}_model"
    download.mkdir(parents=True, exist_ok=True)
    try:
        loaded = load_registered_model(f"models:/{cfg.registry.model_name}/{version}", tracking_uri,
                                       dst_dir=download, trust_remote_code=cfg.model.trust_remote_code)
        stops = stop_token_ids(loaded.tokenizer, loaded.model.generation_config.eos_token_id)
        return score(cfg, loaded.model, loaded.tokenizer, stops, run_dir, label, timings)
    finally:  # a model copy; the registry keeps the original
        shutil.rmtree(download, ignore_errors=True)


def quantization_cost(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Full-precision base minus quantised base, per metric both have (empty without both)."""
    quantised, full = results.get(BASE), results.get(FULL_PRECISION_BASE)
    if not quantised or not full:
        return {}
    return {key: full[key] - quantised[key] for key in _COST_METRICS if key in quantised and key in full}


def compare_models(run_dir: Path, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Write the comparison of every scored model as ``eval/comparison.json`` and ``comparison.png``."""
    from lora_pipeline.evaluation import comparison_table, write_comparison_chart

    table_path = run_dir / "eval" / "comparison.json"
    table_path.write_text(json.dumps(comparison_table(results), indent=2, sort_keys=True))
    chart_path = write_comparison_chart(results, run_dir / "eval" / "comparison.png")
    return {"table": str(table_path), "chart": str(chart_path), "quantization_cost": quantization_cost(results)}
