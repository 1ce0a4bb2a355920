"""The fine-tuning flow: dataset + base model in, a registered, gated, merged model out."""

from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger, runtime

from lora_pipeline.run_request import SUMMARY_JSON_ENV, RunOverrides, load_run_config
from lora_pipeline.evaluate_stage import BASE, CANDIDATE, CHAMPION, FULL_PRECISION_BASE, describe_suites
from lora_pipeline.gate import gate_candidate, resolve_task_metric
from lora_pipeline.reports import gate_rejected_notice, run_failed_notice
from lora_pipeline.stages import registration_store
from lora_pipeline.summary import RunSummary, code_version, final_metrics, lineage_tags, run_dir_for
from lora_pipeline.redaction import mask_secrets, redact_exception
from lora_pipeline.reuse import EXECUTION
from lora_pipeline.tracking import TrackingRun
from tasks.assets import resolve_assets
from tasks.data import format_prompts, validate_data
from tasks.evaluate import compare_models, evaluate, evaluate_champion
from tasks.merge import merge
from tasks.notify import announce
from tasks.policy import one_run_per_model
from tasks.register import apply_aliases, register
from tasks.secrets import load_secrets
from tasks.report import publish_gate_report
from tasks.tracking import close_tracking_run, log_data_report, log_results, open_tracking_run
from tasks.train import train_qlora


@flow(name="finetune")
def finetune(config_path: str | None = None, overrides: RunOverrides | None = None) -> dict:
    """Validate, format, QLoRA-train, evaluate, gate, merge and register one model.

    Steps:
        0. load_secrets    - the Prefect Secret blocks named by ``secrets.env`` into the run's environment;
                             every known secret is redacted from logs, the summary and notices from here on
        1. resolve_assets  - locate the base model and data (build the offline demo world, de-quantise a
                             GGUF base, once) and fingerprint the base weights
        2. open_tracking_run - one MLflow run for the whole pipeline run, config logged as params
        3. validate_data   - clean + quarantine rows, token checks on the model's own chat template, Great
                             Expectations suite (report and Data Docs logged to MLflow), held-out eval split;
                             stops the run on failure
        4. format_prompts  - chat template, answer-only labels, every answer ends in a trained stop token
        5. train_qlora     - 4-bit base + LoRA adapter with TRL's SFTTrainer (resumes by run key)
        6. evaluate        - the same evaluation on the quantised base, the full-precision base, the
                             candidate and the registry's current champion; comparison table and chart
        7. gate            - pure decision: task gain, regression tolerance, stop rate, not worse than
                             the champion; every reason logged, in the summary and as MLflow tags
           publish_gate_report - the decision and comparison table as Prefect artifacts, with the MLflow link
           announce        - a rejected candidate raises `lora-pipeline.gate.rejected` and is sent through
                             ``notify.block`` (a failed run: `lora-pipeline.run.failed`, same block)
        8. merge           - adapter into the de-quantised base, logit parity checked (only for a version
                             registered merged: it passed the gate and registry.store is merged)
        9. register        - MLflow model registry version, merged or adapter + base reference, with
                             lineage tags and a description stating the gate decision (idempotent per run key)
       10. apply_aliases   - a passing version becomes `candidate` (and `champion` with
                             registry.auto_promote; the old champion becomes `previous`)
        Steps 5-10 hold the model's concurrency slot (``model-<registry.model_name>``, one run at a time).
        Steps 3-8 reuse an earlier run's outputs when their inputs are the same, by content
        (:mod:`lora_pipeline.reuse`): an identical re-run computes nothing and registers no new version.

    Args:
        config_path: YAML config under the worker's config roots (the repository's ``configs/``);
            None uses the embedded defaults (the offline demo).
        overrides: The few settings a run form may change (data path, steps, learning rate, LoRA rank,
            model name); the rest comes from the config file and the worker's environment
            (:mod:`lora_pipeline.run_request`).
    """
    logger = get_run_logger()
    # Library progress (demo-world build, training steps) is INFO; Prefect forwards the logger via
    # PREFECT_LOGGING_EXTRA_LOGGERS but leaves its level at the root's WARNING.
    if logging.getLogger("lora_pipeline").level == logging.NOTSET:
        logging.getLogger("lora_pipeline").setLevel(logging.INFO)
    cfg = load_run_config(config_path, overrides)
    load_secrets(cfg.secrets)  # Secret blocks into this run's environment; known secrets redacted from now on
    flow_run_id = str(runtime.flow_run.id)
    # Stable across retries of this flow run: finished stages come back from cache with their outputs.
    run_dir = run_dir_for(cfg.output_dir, flow_run_id, runtime.flow_run.scheduled_start_time)
    summary = RunSummary(flow_run_id=flow_run_id, run_dir=str(run_dir))
    mlflow_run: TrackingRun | None = None
    logger.info("run directory: %s", run_dir)
    try:
        with summary.stage("resolve_assets"):
            assets = resolve_assets(cfg)
            cfg = assets.config
        mlflow_run = open_tracking_run(cfg, str(run_dir), flow_run_id)
        summary.results["mlflow_run_id"] = mlflow_run.run_id
        summary.results["mlflow_tracking_uri"] = mask_secrets(mlflow_run.tracking_uri)
        with summary.stage("validate_data"):
            try:
                data = validate_data(cfg, str(run_dir))
                summary.results["data"] = data
                summary.note(data)
            finally:  # a failed validation is exactly when its report is needed in MLflow
                log_data_report(mlflow_run, str(run_dir / "data"))
        with summary.stage("format_prompts"):
            formatted = format_prompts(cfg, data["clean_path"], str(run_dir))
            summary.note(formatted)
        run_key = cfg.run_key(data["data_hash"], assets.base_fingerprint)
        summary.results["run_key"] = run_key
        # One run per model from training to aliases: two runs of one model never train or register at once.
        with one_run_per_model(cfg.registry.model_name):
            with summary.stage("train_qlora"):
                trained = train_qlora(cfg, formatted["tokenized_path"], str(run_dir), run_key, mlflow_run)
                summary.results["train"] = trained["metrics"]
                summary.note(trained)
            with summary.stage("evaluate"):
                scored = {BASE: evaluate(cfg, str(run_dir), BASE)}  # first: its answers may be the references
                if cfg.eval.full_precision_base and cfg.quant.quantizes:
                    scored[FULL_PRECISION_BASE] = evaluate(cfg, str(run_dir), FULL_PRECISION_BASE)
                scored[CANDIDATE] = evaluate(cfg, str(run_dir), CANDIDATE, trained["adapter_dir"])
                champion = evaluate_champion(cfg, str(run_dir), mlflow_run, run_key, assets.base_fingerprint)
                for label, result in {**scored, CHAMPION: champion}.items():
                    summary.note(result, f"evaluate-{label}")
                results = {label: result["metrics"] for label, result in scored.items()}
                summary.results["champion"] = {k: v for k, v in (champion or {}).items()
                                               if k not in ("metrics", EXECUTION)}
                if champion and champion["metrics"]:
                    results[CHAMPION] = champion["metrics"]
                summary.results["eval"] = results
                summary.results["eval_suites"] = describe_suites(cfg, run_dir)
                summary.results["comparison"] = compare_models(str(run_dir), results, str(cfg.output_dir))
            with summary.stage("gate"):
                task_metric = resolve_task_metric(cfg.gate, cfg.data.format)
                decision = gate_candidate(results[BASE], results[CANDIDATE], cfg.gate,
                                          champion["metrics"] if champion else None, task_metric)
                summary.results["gate"] = decision.to_dict()
                for reason in decision.reasons:
                    logger.info("gate %s: %s", "PASSED" if decision.passed else "FAILED", reason)
                report = publish_gate_report(cfg.registry.model_name, mlflow_run, decision.to_dict(), results,
                                             task_metric)
                if not decision.passed and cfg.notify.on_gate_rejected:
                    announce(cfg.notify, gate_rejected_notice(cfg.registry.model_name, decision.to_dict(),
                                                              report["run_url"], runtime.flow_run.name),
                             return_state=True)  # a notification that cannot be sent never fails the run
            store = registration_store(cfg.registry, decision.passed)
            merged_dir = None
            if store == "merged":
                with summary.stage("merge"):
                    summary.results["merge"] = merge(cfg, trained["adapter_dir"], str(run_dir))
                    summary.note(summary.results["merge"])
                    merged_dir = summary.results["merge"]["merged_dir"]
            else:
                summary.skip("merge", "registered as adapter + base reference (gate failed or registry.store=adapter)")
            lineage = lineage_tags(
                run_key=run_key, config_hash=cfg.config_hash(), data_hash=data["data_hash"],
                base_model=cfg.model.name_or_path, base_revision=cfg.model.revision,
                base_fingerprint=assets.base_fingerprint, flow_run_id=flow_run_id, git_commit=code_version(),
                gate=summary.results["gate"], store=store)
            with summary.stage("register"):
                registered = register(cfg, merged_dir, trained["adapter_dir"], str(run_dir), mlflow_run, run_key,
                                      lineage, store, report["description"])
                summary.results["registered_model"] = registered
            with summary.stage("apply_aliases"):
                summary.results["registry"] = apply_aliases(cfg, mlflow_run, registered["version"],
                                                            decision.passed)
        log_results(mlflow_run, final_metrics(summary.results), {"gate_passed": str(decision.passed),
                    "gate_reasons": lineage["gate_reasons"], "reused_stages": ", ".join(summary.cached_stages())},
                    str(run_dir / "eval"))
        summary.status = "completed"
        return summary.to_dict()
    except Exception as exc:
        redact_exception(exc)  # what Prefect makes the flow run's state message (its tasks' are clean already)
        if cfg.notify.on_failure:  # as with the gate: a notification that cannot be sent changes nothing
            announce(cfg.notify, run_failed_notice(cfg.registry.model_name, summary.error or f"{type(exc).__name__}: "
                                                   f"{exc}", summary.failed_stage, runtime.flow_run.name),
                     return_state=True)
        raise
    finally:
        summary.write(run_dir / "summary.json", os.environ.get(SUMMARY_JSON_ENV))
        if mlflow_run is not None:
            close_tracking_run(mlflow_run, "FINISHED" if summary.status == "completed" else "FAILED")
