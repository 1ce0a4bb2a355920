"""Stage entry points: one function per pipeline stage, each taking the resolved config and paths.

Prefect tasks wrap exactly one of these; they exchange paths, hashes and small metric dicts, never
models or datasets, so every stage can be retried or re-run alone. The stages that compute (validate,
format, train, evaluate, merge) first look for a record of the same inputs left by an earlier run
(:mod:`lora_pipeline.reuse`, keyed by :mod:`lora_pipeline.stage_inputs`) and take their outputs from it;
each of their results says how it was obtained under ``execution`` (its math seconds, or the run it was
reused from).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_pipeline.base_model import convert_gguf, is_gguf_file, model_stop_ids
from lora_pipeline.chat_templates import turn_markers
from lora_pipeline.config import AUTO, BASE_ANSWERS, BUILTIN_DEMO, PipelineConfig, RegistryConfig
from lora_pipeline.data import ValidationResult, validate_dataset
from lora_pipeline.demo_world import ensure_demo_world
from lora_pipeline.formatting import check_tokenizer, format_dataset
from lora_pipeline import stage_inputs
from lora_pipeline.reuse import EXECUTION, execution, reused_or_computed
from lora_pipeline.suites import GENERAL_PROMPTS, GENERAL_TEXT, load_eval_suites, sample_prompts

# torch, transformers, peft and TRL (modeling, training, merge) and mlflow (tracking) are imported by the
# stages that compute or track, not here: a re-run whose stages are all reused never pays seconds for them.
if TYPE_CHECKING:
    from lora_pipeline.registry import RegisteredVersion
    from lora_pipeline.tracking import TrackingRun

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage refused to continue; the message names the rule and where to look."""


@dataclass(frozen=True)
class ResolvedAssets:
    """The config with every input made concrete, and the identity of the base weights (for the run key)."""

    config: PipelineConfig
    base_fingerprint: str


def resolve_assets(cfg: PipelineConfig) -> ResolvedAssets:
    """Make every input concrete: ``builtin:demo`` paths point at the cached demo world (built on first
    use), a ``.gguf`` base at its cached de-quantised directory, ``auto`` regression suites at the demo's
    (for the demo model) or the package's general ones; and fingerprint the base weights."""
    demo_model = cfg.model.name_or_path == BUILTIN_DEMO
    qa, text = cfg.eval.regression_qa_path, cfg.eval.regression_text_path
    qa = (BUILTIN_DEMO if demo_model else BASE_ANSWERS) if qa == AUTO else qa
    text = (BUILTIN_DEMO if demo_model else str(GENERAL_TEXT)) if text == AUTO else text
    model_path, data_path, eval_path = cfg.model.name_or_path, cfg.data.path, cfg.data.eval_path
    if eval_path is None and data_path == BUILTIN_DEMO:
        eval_path = BUILTIN_DEMO  # the demo world ships its own held-out rows
    if BUILTIN_DEMO in (model_path, data_path, eval_path, qa, text):
        world = ensure_demo_world(cfg.demo, cfg.output_dir / "cache" / "demo-world", log=logger.info)
        demo_paths = {"model": world.model_dir, "data": world.train_path, "eval": world.eval_path,
                      "qa": world.regression_qa_path, "text": world.regression_text_path}
        model_path, data_path, eval_path, qa, text = (
            str(demo_paths[key]) if value == BUILTIN_DEMO else value
            for key, value in (("model", model_path), ("data", data_path), ("eval", eval_path), ("qa", qa),
                               ("text", text)))
    model_path = local_base_path(model_path, cfg)
    resolved = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"name_or_path": model_path}),
        "data": cfg.data.model_copy(update={"path": data_path, "eval_path": eval_path}),
        "eval": cfg.eval.model_copy(update={"regression_qa_path": qa, "regression_text_path": text}),
    })
    return ResolvedAssets(resolved, stage_inputs.fingerprint(model_path, cfg.model.revision))


def local_base_path(name_or_path: str, cfg: PipelineConfig) -> str:
    """``name_or_path``, or for a ``.gguf`` file its de-quantised directory (converted once, cached by hash)."""
    if is_gguf_file(name_or_path):
        return str(convert_gguf(Path(name_or_path), cfg.output_dir / "cache" / "gguf", log=logger.info))
    return name_or_path


def preflight(cfg: PipelineConfig) -> None:
    """Refuse, before any run starts, a user's base whose tokenizer cannot be trained on (the demo's can).

    Raises:
        FormatError: ``<rule>: <why>``.
    """
    if cfg.model.name_or_path == BUILTIN_DEMO:
        return
    model = cfg.model.model_copy(update={"name_or_path": local_base_path(cfg.model.name_or_path, cfg)})
    training_tokenizer(cfg.model_copy(update={"model": model}))


def stop_ids(cfg: PipelineConfig, tokenizer: Any) -> list[int]:
    """The base model's whole stop set (EOS, end-of-turn token, generation config's eos ids)."""
    return model_stop_ids(cfg.model.name_or_path, cfg.model.revision, tokenizer)


def training_tokenizer(cfg: PipelineConfig) -> tuple[Any, list[int]]:
    """The base tokenizer (with ``model.chat_template``) and its stop set, refused early if unusable.

    Raises:
        FormatError: ``<rule>: <why>`` (see :func:`lora_pipeline.formatting.check_tokenizer`).
    """
    from lora_pipeline.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    stops = stop_ids(cfg, tokenizer)
    check_tokenizer(tokenizer, stops, chat=cfg.data.format != "text")
    return tokenizer, stops


def check_data(cfg: PipelineConfig, out_dir: Path) -> ValidationResult:
    """Clean, quarantine and GX-validate the training rows into ``out_dir`` (never raises on bad rows).

    The training tokenizer (with its chat template) templates and truncates every row as training will,
    and held-out eval/regression files are used to decontaminate the training set. With
    ``data.eval_path`` unset, the held-out split is written beside the clean rows.

    Raises:
        FormatError: the tokenizer cannot be trained on (checked once, before any row).
    """
    tokenizer, stops = training_tokenizer(cfg)
    qa = GENERAL_PROMPTS if cfg.eval.regression_qa_path == BASE_ANSWERS else cfg.eval.regression_qa_path
    held_out = [Path(p) for p in (cfg.data.eval_path, qa) if p]
    return validate_dataset(
        cfg.data,
        cfg.data.path,
        out_dir,
        special_tokens=[*tokenizer.all_special_tokens, *turn_markers(cfg.model.chat_template)],
        decontaminate_against=[p for p in held_out if p.is_file()],
        tokenizer=tokenizer,
        stop_ids=stops,
        held_out_fraction=cfg.data.eval_fraction if cfg.data.eval_path is None else None,
    )


def validate_data(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """The flow's data stage: :func:`check_data` under ``run_dir/data``; stops the run if it fails."""
    def compute() -> dict[str, Any]:
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
            "n_held_out": result.n_held_out,
            EXECUTION: execution(),  # no math: cleaning, token checks and Great Expectations
        }

    return reused_or_computed(cfg.output_dir, "validate_data", stage_inputs.validate_inputs(cfg), run_dir, compute,
                              [run_dir / "data"])


#: What of the data stage's output goes to MLflow: the evidence, not the (possibly large) clean rows.
DATA_ARTIFACTS = ("report.json", "gx_validation_result.json", "quarantine.jsonl", "data_docs")


def log_data_artifacts(run: TrackingRun, data_dir: Path) -> list[str]:
    """Log the data report, GX result, quarantine and Data Docs (those that exist) under ``data/``."""
    from lora_pipeline import tracking

    logged = []
    for name in DATA_ARTIFACTS:
        path = data_dir / name
        if path.exists():
            artifact_path = "data/" + name if path.is_dir() else "data"
            tracking.log_artifacts(run.tracking_uri, run.run_id, path, artifact_path)
            logged.append(name)
    return logged


def format_prompts(cfg: PipelineConfig, clean_path: Path, run_dir: Path) -> dict[str, Any]:
    """Apply the chat template, mask non-assistant tokens and prove every answer ends in a trained stop token."""
    return reused_or_computed(cfg.output_dir, "format_prompts", stage_inputs.format_inputs(cfg, clean_path), run_dir,
                              lambda: _format_prompts(cfg, clean_path, run_dir), [run_dir / "formatted"])


def _format_prompts(cfg: PipelineConfig, clean_path: Path, run_dir: Path) -> dict[str, Any]:
    from lora_pipeline.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    out_dir = run_dir / "formatted"
    report = format_dataset(tokenizer, clean_path, out_dir / "tokenized.jsonl", cfg.data.max_length,
                            stop_ids(cfg, tokenizer), chat=cfg.data.format != "text")
    (out_dir / "format_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if report.n_written < cfg.data.min_rows:
        raise StageError(
            f"only {report.n_written} rows keep trainable tokens after truncation to data.max_length="
            f"{cfg.data.max_length} (data.min_rows={cfg.data.min_rows}); first rejected lines of "
            f"{clean_path}: {report.rejected_lines[:5]}"
        )
    # The flow passes small dicts: the full list of rejected lines stays in format_report.json.
    summary = {k: v for k, v in report.to_dict().items() if k != "rejected_lines"}
    return {"tokenized_path": str(out_dir / "tokenized.jsonl"), "n_rejected": len(report.rejected_lines), **summary,
            EXECUTION: execution()}


def apply_aliases(cfg: PipelineConfig, tracking_uri: str, version: str, gate_passed: bool) -> dict[str, Any]:
    """After registration: a passing version becomes ``candidate``, and ``champion`` with
    ``registry.auto_promote``; a failing one gets no alias. Returns the model's aliases afterwards."""
    from lora_pipeline import promotion

    name = cfg.registry.model_name
    promoted = False
    if gate_passed:
        promotion.set_candidate(tracking_uri, name, version)
        if cfg.registry.auto_promote:
            promotion.promote(tracking_uri, name, version)
            promoted = True
    return {"aliases": promotion.aliases(tracking_uri, name), "promoted": promoted}


def train(cfg: PipelineConfig, tokenized_path: Path, run_dir: Path, run_key: str,
          run: TrackingRun | None = None) -> dict[str, Any]:
    """QLoRA-train the adapter; returns its directory and the training metrics.

    A record of the same training (same run key and tokenized samples, see
    :func:`lora_pipeline.stage_inputs.train_inputs`) gives the adapter back without loading a model; its
    metrics then say this session trained nothing (``resumed_from_step`` = ``global_step``, 0 seconds).
    Otherwise checkpoints live in ``output_dir/checkpoints/<run_key>``: a Prefect retry, or a new run of
    the same config on the same data, resumes from the last intact one; any change of either starts afresh.
    Two runs of one run key at once are serialised by a lock beside that directory.
    ``train.num_processes > 1`` or ``train.num_machines > 1`` launches the ranks with torchrun (see
    :mod:`lora_pipeline.distributed`);
    per-step metrics go to the MLflow ``run`` (from rank 0 only).
    """
    from lora_pipeline import tracking

    curves = run_dir / "train"  # the loss curve
    trained = reused_or_computed(cfg.output_dir, "train_qlora", stage_inputs.train_inputs(cfg, tokenized_path, run_key),
                                 run_dir, lambda: _train(cfg, tokenized_path, run_dir, run_key, run),
                                 [run_dir / "adapter", curves])
    if trained[EXECUTION]["reused_from"]:
        done = trained["metrics"]["global_step"]
        trained["metrics"] = {**trained["metrics"], "train_seconds": 0.0, "train_step_seconds": 0.0,
                              "tokens_per_second": 0.0, "resumed_from_step": done}
    if run and curves.is_dir():
        tracking.log_artifacts(run.tracking_uri, run.run_id, curves, "train")
    return trained


def _train(cfg: PipelineConfig, tokenized_path: Path, run_dir: Path, run_key: str,
           run: TrackingRun | None) -> dict[str, Any]:
    from contextlib import nullcontext
    from functools import partial

    from lora_pipeline import tracking
    from lora_pipeline.checkpoints import exclusive_run_key
    from lora_pipeline.distributed import launch_training
    from lora_pipeline.training import train_qlora

    checkpoint_dir = cfg.output_dir / "checkpoints" / run_key
    monitor = tracking.system_metrics(run.tracking_uri, run.run_id, cfg.mlflow.system_metrics_interval) \
        if run else nullcontext()
    with exclusive_run_key(checkpoint_dir), monitor:  # one run trains a run key at a time
        if cfg.train.distributed:
            trained = launch_training(cfg, tokenized_path, run_dir, checkpoint_dir, run)
        else:
            sink = partial(tracking.log_step_metrics, run.tracking_uri, run.run_id) if run else None
            result = train_qlora(cfg, tokenized_path, run_dir, metrics_sink=sink, checkpoint_dir=checkpoint_dir)
            trained = {"adapter_dir": str(result.adapter_dir), "metrics": result.metrics}
    # The loop's math: the optimizer steps (a run that found its training finished in checkpoints did none).
    return {**trained, EXECUTION: execution(trained["metrics"].get("train_step_seconds", 0.0))}


def merge(cfg: PipelineConfig, adapter_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Merge the adapter into the de-quantised base under ``run_dir/merged`` and check logit parity.

    The merged model stops on the base's whole stop set (``generation_config.eos_token_id`` is a list).
    """
    def compute() -> dict[str, Any]:
        from lora_pipeline.merge import merge_adapter
        from lora_pipeline.modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, adapter_dir)
        prompts = sample_prompts(tokenizer, load_eval_suites(cfg, run_dir), cfg.merge.parity_samples)
        report = merge_adapter(cfg, adapter_dir, run_dir / "merged", prompts, stop_ids(cfg, tokenizer))
        return {**report.to_dict(), EXECUTION: execution(report.math_seconds)}

    return reused_or_computed(cfg.output_dir, "merge", stage_inputs.merge_inputs(cfg, adapter_dir, run_dir), run_dir,
                              compute, [run_dir / "merged"])


def open_tracking(cfg: PipelineConfig, run_dir: Path, flow_run_id: str) -> TrackingRun:
    """Create this pipeline run's single MLflow run and log the flattened config (secrets masked)."""
    from lora_pipeline import tracking

    uri = tracking.resolve_tracking_uri(cfg.mlflow, cfg.output_dir)
    run_id = tracking.start_pipeline_run(
        uri, cfg.mlflow.experiment_name, cfg.output_dir / "mlartifacts", run_name=run_dir.name,
        tags={"flow_run_id": flow_run_id, "config_hash": cfg.config_hash(), "run_dir": str(run_dir)},
    )
    tracking.log_params(uri, run_id, tracking.flatten_config(cfg.model_dump(mode="json")))
    return tracking.TrackingRun(tracking_uri=uri, run_id=run_id)


def registration_store(registry: RegistryConfig, gate_passed: bool) -> str:
    """How a version is stored: ``registry.store`` for one that passed the gate; a failing one keeps only
    its adapter and a reference to its base (it is kept for the record, not to be served)."""
    return registry.store if gate_passed else "adapter"


def adapter_base_dir(cfg: PipelineConfig) -> Path | None:
    """The base an adapter-form version references when it is not the base itself (None): for a quantised
    ``quant``, the weights the adapter was trained on, de-quantised as the merge does and saved once under
    ``output_dir/cache/dequantized-base`` (keyed by the base's content, ``quant.*`` and the device type).

    The same QLoRA adapter on SmolLM2's original float32 weights answers 52.5 % of the task right,
    against 97.5 % on the quantised weights it was trained and gated on.
    """
    if not cfg.quant.quantizes:
        return None  # the registry resolves the base as named (a directory, or a hub id cached locally)
    from lora_pipeline.build_once import build_once
    from lora_pipeline.merge import save_dequantized_base
    from lora_pipeline.modeling import detect_device
    from lora_pipeline.reuse import key_of

    key = key_of(stage_inputs.dequantized_base_inputs(cfg, detect_device().type))
    name = Path(cfg.model.name_or_path.rstrip("/")).name or "base"
    final = cfg.output_dir / "cache" / "dequantized-base" / f"{name}-{key[:16]}"
    return build_once(final, lambda staging: save_dequantized_base(cfg, staging), logger.info,
                      "de-quantised base")


def register(
    cfg: PipelineConfig,
    merged_dir: Path | None,
    adapter_dir: Path,
    run_dir: Path,
    run: TrackingRun,
    run_key: str,
    tags: dict[str, str],
    store: str,
    description: str | None = None,
) -> dict[str, Any]:
    """Register this run's model once per run key: the merged model, or the adapter + a base reference.

    Either form stops on the base's whole stop set; the adapter form loads :func:`adapter_base_dir`.
    When the run key was registered before (a retry, or a re-run with only gate/eval/registry settings
    changed), that version is returned, without loading anything, and its gate tags (and ``description``:
    the gate decision and run link) are updated to this run's decision, so its lineage says how it was
    last judged.
    """
    from lora_pipeline import registry

    version = registry.find_version_by_run_key(run.tracking_uri, cfg.registry.model_name, run_key) \
        or _register_new(cfg, merged_dir, adapter_dir, run_dir, run, run_key, tags, store, description)
    if not version.created:
        registry.set_version_tags(run.tracking_uri, version.name, version.version,
                                  {key: tags[key] for key in ("gate_passed", "gate_reasons", "flow_run_id")},
                                  description)
    return {"name": version.name, "version": version.version, "model_uri": version.model_uri,
            "created": version.created}


def _register_new(cfg: PipelineConfig, merged_dir: Path | None, adapter_dir: Path, run_dir: Path, run: TrackingRun,
                  run_key: str, tags: dict[str, str], store: str, description: str | None) -> RegisteredVersion:
    from lora_pipeline import registry
    from lora_pipeline.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, adapter_dir)
    suites = load_eval_suites(cfg, run_dir)
    input_example = suites.task[0]["messages"][:-1] if suites.task else "Hello"
    return registry.register_model(
        tracking_uri=run.tracking_uri,
        run_id=run.run_id,
        registry_cfg=cfg.registry,
        run_key=run_key,
        tags=tags,
        input_example=input_example,
        model_dir=merged_dir,
        adapter_dir=adapter_dir,
        base_model=cfg.model.name_or_path,
        base_revision=cfg.model.revision,
        base_model_dir=adapter_base_dir(cfg) if store == "adapter" else None,
        store=store,  # type: ignore[arg-type]
        eos_token_ids=stop_ids(cfg, tokenizer),
        description=description,
        trust_remote_code=cfg.model.trust_remote_code,
    )
