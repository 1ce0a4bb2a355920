"""What a run tells people: the model version's description, the gate report, and notices.

Three readers, one source of figures (the evaluation results and the gate decision):

- the MLflow UI: a model version's *description* states the gate decision and links the run that
  produced it, while the figures stay on the run as metrics (``eval/<label>/<metric>``), not as dozens
  of version tags;
- the Prefect UI: the gate report (Markdown) and the comparison table become flow-run artifacts;
- on-call people: a failed run and a gate rejection each become a :class:`Notice`, which the tasks
  layer raises as a Prefect event and sends through the configured notification block.

Nothing here imports Prefect or talks to a server: these are pure functions of their inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lora_pipeline.redaction import mask_secrets

#: Event names (Prefect events; automations can match on them).
GATE_REJECTED_EVENT = "lora-pipeline.gate.rejected"
RUN_FAILED_EVENT = "lora-pipeline.run.failed"
#: The metrics the comparison table shows first (others follow alphabetically).
_HEADLINE_METRICS = ("task_exact_match", "task_token_f1", "task_rouge_l", "task_perplexity",
                     "regression_exact_match", "regression_rouge_l", "regression_perplexity", "task_stop_rate")


@dataclass(frozen=True)
class Notice:
    """One thing worth telling people about a run: an event to raise and a message to send."""

    event: str
    model_name: str
    subject: str
    body: str
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def resource(self) -> dict[str, str]:
        """The Prefect event resource: the registered model the run was for."""
        return {"prefect.resource.id": f"lora-pipeline.model.{self.model_name}",
                "prefect.resource.name": self.model_name}


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free-form parts."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def comparison_rows(results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The comparison table as rows, ``{"metric": ..., "<model label>": value, ...}``, headline metrics first."""
    metrics = sorted({key for scores in results.values() for key in scores},
                     key=lambda key: (_HEADLINE_METRICS.index(key) if key in _HEADLINE_METRICS
                                      else len(_HEADLINE_METRICS), key))
    return [{"metric": key, **{label: round(scores[key], 4) for label, scores in results.items() if key in scores}}
            for key in metrics]


def _markdown_table(results: dict[str, dict[str, float]]) -> str:
    labels = list(results)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row in comparison_rows(results):
        lines.append(f"| {row['metric']} | " + " | ".join(
            f"{row[label]:.4f}" if label in row else "-" for label in labels) + " |")
    return "\n".join(lines)


def _verdict(gate: dict[str, Any]) -> str:
    return "PASSED" if gate["passed"] else "REJECTED"


def gate_report(model_name: str, gate: dict[str, Any], results: dict[str, dict[str, float]],
                run_url: str | None, version: str | None = None) -> str:
    """The gate decision as Markdown: verdict, every rule's outcome, the comparison table, the MLflow link."""
    title = f"# Gate {_verdict(gate)}: {model_name}" + (f" version {version}" if version else "")
    rules = "\n".join(f"- {reason}" for reason in gate["reasons"])
    link = f"\n\nMLflow run: [{run_url}]({run_url})" if run_url else ""
    return mask_secrets(f"{title}\n\n## Rules\n{rules}\n\n## Comparison\n{_markdown_table(results)}{link}\n")


def version_description(gate: dict[str, Any], results: dict[str, dict[str, float]], run_id: str,
                        run_url: str | None, task_metric: str) -> str:
    """A model version's description for the MLflow UI: the gate decision, the headline figures, the run.

    The full figures are the run's metrics (``eval/<label>/<metric>``); the description names only what
    a person deciding on promotion reads first.
    """
    headline = [f"{label} {scores[key]:.4f}" for label, scores in results.items()
                for key in (f"task_{task_metric}",) if key in scores]
    figures = f"task {task_metric}: " + ", ".join(headline) if headline else ""
    failed = [reason for reason in gate["reasons"] if reason.startswith("FAIL")]
    why = " ".join(failed) if failed else gate["reasons"][0] if gate["reasons"] else ""
    run = f"[{run_id}]({run_url})" if run_url else run_id
    text = f"Gate {_verdict(gate)}. {why}\n\n{figures}\n\nTrained and evaluated by MLflow run {run}; every " \
           f"figure is a metric of that run (eval/<model>/<metric>)."
    return mask_secrets(text)


def gate_rejected_notice(model_name: str, gate: dict[str, Any], run_url: str | None,
                         flow_run_name: str) -> Notice:
    """The notice for a candidate the gate rejected (stored as an adapter, no alias moved)."""
    failed = [reason for reason in gate["reasons"] if reason.startswith("FAIL")]
    body = "\n".join([f"Flow run {flow_run_name}: the candidate for {model_name} did not pass the gate.", *failed,
                      *([f"MLflow run: {run_url}"] if run_url else [])])
    return Notice(GATE_REJECTED_EVENT, model_name, f"lora-pipeline: gate rejected a candidate for {model_name}",
                  mask_secrets(body), {"reasons": [mask_secrets(r) for r in gate["reasons"]],
                                       "flow_run_name": flow_run_name})


def run_failed_notice(model_name: str, error: str, failed_stage: str | None, flow_run_name: str) -> Notice:
    """The notice for a run that failed (any stage; the error is masked of credentials)."""
    where = f" in stage {failed_stage}" if failed_stage else ""
    body = mask_secrets(f"Flow run {flow_run_name} for {model_name} failed{where}: {error}")
    return Notice(RUN_FAILED_EVENT, model_name, f"lora-pipeline: run for {model_name} failed{where}", body,
                  {"stage": failed_stage or "", "error": mask_secrets(error), "flow_run_name": flow_run_name})


def rescore_tags(gate: dict[str, Any], champion_version: str | None, flow_run_name: str,
                 run_id: str) -> dict[str, str]:
    """Tags a re-evaluated version carries: the fresh decision, against which champion, by which run."""
    return {"rescore_gate_passed": str(gate["passed"]), "rescore_gate_reasons": "; ".join(gate["reasons"]),
            "rescore_vs_champion": champion_version or "none", "rescored_by": f"flow run {flow_run_name}",
            "rescore_mlflow_run_id": run_id}
