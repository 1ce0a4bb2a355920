"""The fine-tuning flow: dataset + base model in, a registered, gated, merged model out."""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger, runtime

from lora_pipeline.config import load_config
from lora_pipeline.gate import gate_candidate
from lora_pipeline.summary import RunSummary, new_run_dir
from lora_pipeline.tracking import code_version, mask_secrets
from tasks.assets import resolve_assets
from tasks.data import format_prompts, validate_data
from tasks.evaluate import compare_models, evaluate, evaluate_champion
from tasks.merge import merge
from tasks.register import apply_aliases, register
from tasks.tracking import close_tracking_run, log_data_report, log_results, open_tracking_run
from tasks.train import train_qlora


@flow(name="finetune")
def finetune(config_path: str | None = None, overrides: list[str] | None = None, summary_json: str | None = None) -> dict:
    """Validate, format, QLoRA-train, evaluate, gate, merge and register one model.

    Steps:
        1. resolve_assets  - locate the base model and data (build the offline demo world if asked)
        2. open_tracking_run - one MLflow run for the whole pipeline run, config logged as params
        3. validate_data   - clean + quarantine rows, token checks, Great Expectations suite (report and
                             Data Docs logged to MLflow); stops the run on failure
        4. format_prompts  - chat template, assistant-only labels, EOS-unmasked proof
        5. train_qlora     - 4-bit base + LoRA adapter with TRL's SFTTrainer
        6. evaluate        - the same evaluation on the base model, the candidate and the registry's
                             current champion; comparison table and bar chart
        7. gate            - pure decision: task gain, regression tolerance, stop rate, not worse than
                             the champion; every reason logged, in the summary and as MLflow tags
        8. merge           - adapter into the de-quantised base, logit parity checked
        9. register        - MLflow model registry version with lineage tags (idempotent per run key)
       10. apply_aliases   - a passing version becomes `candidate` (and `champion` with
                             registry.auto_promote; the old champion becomes `previous`)

    Args:
        config_path: YAML config; None uses the embedded defaults (the offline demo).
        overrides: ``a.b=c`` strings applied on top of the file.
        summary_json: also write the run summary to this path.
    """
    logger = get_run_logger()
    # Library progress (demo-world build, training steps) is INFO; Prefect forwards the logger via
    # PREFECT_LOGGING_EXTRA_LOGGERS but leaves its level at the root's WARNING.
    if logging.getLogger("lora_pipeline").level == logging.NOTSET:
        logging.getLogger("lora_pipeline").setLevel(logging.INFO)
    cfg = load_config(config_path, overrides or [])
    flow_run_id = str(runtime.flow_run.id)
    run_dir = new_run_dir(cfg.output_dir, flow_run_id)
    summary = RunSummary(flow_run_id=flow_run_id, run_dir=str(run_dir))
    tracking_info: dict[str, str] | None = None
    logger.info("run directory: %s", run_dir)
    try:
        with summary.stage("resolve_assets"):
            cfg = resolve_assets(cfg)
        tracking_info = open_tracking_run(cfg, str(run_dir), flow_run_id)
        summary.results["mlflow_run_id"] = tracking_info["run_id"]
        summary.results["mlflow_tracking_uri"] = mask_secrets(tracking_info["tracking_uri"])
        with summary.stage("validate_data"):
            try:
                data = validate_data(cfg, str(run_dir))
                summary.results["data"] = data
            finally:  # a failed validation is exactly when its report is needed in MLflow
                log_data_report(tracking_info, str(run_dir / "data"))
        with summary.stage("format_prompts"):
            formatted = format_prompts(cfg, data["clean_path"], str(run_dir))
        run_key = cfg.run_key(data["data_hash"])
        with summary.stage("train_qlora"):
            trained = train_qlora(cfg, formatted["tokenized_path"], str(run_dir), run_key, tracking_info)
            summary.results["train"] = trained["metrics"]
        with summary.stage("evaluate"):
            base_metrics = evaluate(cfg, str(run_dir), "base")
            candidate_metrics = evaluate(cfg, str(run_dir), "candidate", trained["adapter_dir"])
            summary.results["eval"] = {"base": base_metrics, "candidate": candidate_metrics}
            champion = evaluate_champion(cfg, str(run_dir), tracking_info, run_key)
            summary.results["champion"] = {k: v for k, v in (champion or {}).items() if k != "metrics"}
            if champion and champion["metrics"]:
                summary.results["eval"]["champion"] = champion["metrics"]
            summary.results["comparison"] = compare_models(str(run_dir), summary.results["eval"])
        with summary.stage("gate"):
            champion_metrics = champion["metrics"] if champion else None
            decision = gate_candidate(base_metrics, candidate_metrics, cfg.gate, champion_metrics)
            summary.results["gate"] = decision.to_dict()
            for reason in decision.reasons:
                logger.info("gate %s: %s", "PASSED" if decision.passed else "FAILED", reason)
        with summary.stage("merge"):
            merged = merge(cfg, trained["adapter_dir"], str(run_dir))
            summary.results["merge"] = merged
        gate_reasons = "; ".join(decision.reasons)
        lineage = {
            "run_key": run_key, "config_hash": cfg.config_hash(), "data_hash": data["data_hash"],
            "base_model": cfg.model.name_or_path, "base_model_revision": cfg.model.revision or "",
            "flow_run_id": flow_run_id, "git_commit": code_version(), "gate_passed": str(decision.passed),
            "gate_reasons": gate_reasons,
            **{f"eval.{name}.{k}": f"{v:.4f}" for name, m in summary.results["eval"].items() for k, v in m.items()},
        }
        with summary.stage("register"):
            registered = register(cfg, merged["merged_dir"], trained["adapter_dir"], tracking_info, run_key, lineage)
            summary.results["registered_model"] = registered
        with summary.stage("apply_aliases"):
            summary.results["registry"] = apply_aliases(cfg, tracking_info, registered["version"], decision.passed)
        log_results(tracking_info, _final_metrics(summary.results), {"gate_passed": str(decision.passed),
                    "gate_reasons": gate_reasons}, str(run_dir / "eval"))
        summary.status = "completed"
        return summary.to_dict()
    finally:
        summary.write(run_dir / "summary.json", summary_json)
        if tracking_info is not None:
            close_tracking_run(tracking_info, "FINISHED" if summary.status == "completed" else "FAILED")


def _final_metrics(results: dict) -> dict[str, float]:
    metrics = {f"eval/{label}/{k}": float(v) for label, m in results["eval"].items() for k, v in m.items()}
    # Training totals (trainable parameters and ratio, peak memory, tokens/s, resumed-from step).
    metrics.update({f"train_summary/{k}": float(v) for k, v in results["train"].items()})
    metrics["merge/merge_rel_diff"] = float(results["merge"]["merge_rel_diff"])
    metrics["merge/quantized_rel_diff"] = float(results["merge"]["quantized_rel_diff"])
    metrics["gate/passed"] = float(results["gate"]["passed"])
    return metrics
