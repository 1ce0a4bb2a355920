"""The evaluation flow: re-score any registered version against the current champion, on today's suites."""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, runtime

from lora_pipeline.evaluate_stage import BASE, CHAMPION, describe_suites
from lora_pipeline.gate import gate_candidate, resolve_task_metric
from lora_pipeline.reports import rescore_tags
from lora_pipeline.run_request import SUMMARY_JSON_ENV, RunOverrides, load_run_config
from lora_pipeline.summary import RunSummary, final_metrics, run_dir_for
from lora_pipeline.tracking import TrackingRun
from tasks.assets import resolve_assets
from tasks.data import validate_data
from tasks.evaluate import compare_models, evaluate, evaluate_registered
from tasks.registry import alias_version, tag_version
from tasks.report import publish_gate_report
from tasks.secrets import load_secrets
from tasks.tracking import close_tracking_run, log_results, open_tracking_run


@flow(name="evaluate")
def evaluate_version(model_name: str, version: str, config_path: str | None = None) -> dict:
    """Score ``version`` of ``model_name`` and the current champion on the config's suites, and judge it.

    Steps:
        1. resolve_assets      - the config's base model (for the base's scores and regression references)
        2. open_tracking_run   - an MLflow run for this evaluation; every figure becomes its metric
        3. validate_data       - the task suite: the config's held-out rows (or split), as a training run sees them
        4. evaluate base       - the base as quantised for training (its answers may be the references)
        5. evaluate_registered - the version and the current ``champion`` as registered: what serving loads
        6. compare_models      - the comparison table and chart
        7. gate                - the training gate's rules with the version as candidate (task gain over the
                                 base, regression tolerance, stop rate, not worse than the champion)
        8. publish_gate_report - decision and table as Prefect artifacts, with the MLflow link
        9. tag_version         - the decision on the version (``rescore_*`` tags); aliases are not moved:
                                 promotion stays a decision (the ``promote`` flow)

    Args:
        model_name: Registered model name.
        version: Version number to re-score.
        config_path: Config whose suites, model and registry to use (under the worker's config roots);
            None uses the embedded defaults (the demo).
    """
    logger = get_run_logger()
    cfg = load_run_config(config_path, RunOverrides(registry_model_name=model_name))
    load_secrets(cfg.secrets)
    flow_run_id = str(runtime.flow_run.id)
    run_dir = run_dir_for(cfg.output_dir, flow_run_id, runtime.flow_run.scheduled_start_time)
    summary = RunSummary(flow_run_id=flow_run_id, run_dir=str(run_dir))
    mlflow_run: TrackingRun | None = None
    try:
        with summary.stage("resolve_assets"):
            cfg = resolve_assets(cfg).config
        mlflow_run = open_tracking_run(cfg, str(run_dir), flow_run_id)
        summary.results["mlflow_run_id"] = mlflow_run.run_id
        with summary.stage("validate_data"):
            validate_data(cfg, str(run_dir))
        label = f"v{version}"
        with summary.stage("evaluate"):
            results = {BASE: evaluate(cfg, str(run_dir), BASE)["metrics"]}
            results[label] = evaluate_registered(cfg, str(run_dir), mlflow_run, version, label)
            champion = alias_version(mlflow_run, model_name, "champion")
            if champion is not None:
                results[CHAMPION] = (results[label] if champion == version else
                                     evaluate_registered(cfg, str(run_dir), mlflow_run, champion, CHAMPION))
            summary.results.update(eval=results, champion=champion, eval_suites=describe_suites(cfg, run_dir),
                                   comparison=compare_models(str(run_dir), results))
        with summary.stage("gate"):
            task_metric = resolve_task_metric(cfg.gate, cfg.data.format)
            decision = gate_candidate(results[BASE], results[label], cfg.gate, results.get(CHAMPION), task_metric)
            summary.results["gate"] = decision.to_dict()
            publish_gate_report(model_name, mlflow_run, decision.to_dict(), results, task_metric, "rescore", version)
            tag_version(mlflow_run, model_name, version,
                        rescore_tags(decision.to_dict(), champion, runtime.flow_run.name, mlflow_run.run_id))
            logger.info("%s version %s vs champion %s: %s", model_name, version, champion,
                        "PASSED" if decision.passed else "REJECTED")
        log_results(mlflow_run, final_metrics({"eval": results, "train": {}, "gate": summary.results["gate"]}),
                    {"rescored_model": f"{model_name}/{version}"}, str(run_dir / "eval"))
        summary.status = "completed"
        return summary.to_dict()
    finally:
        summary.write(run_dir / "summary.json", os.environ.get(SUMMARY_JSON_ENV))
        if mlflow_run is not None:
            close_tracking_run(mlflow_run, "FINISHED" if summary.status == "completed" else "FAILED")
