"""What a run tells people: version description, gate report, notices (pure functions, no servers)."""

from __future__ import annotations

from lora_pipeline.reports import (
    GATE_REJECTED_EVENT,
    RUN_FAILED_EVENT,
    artifact_key,
    comparison_rows,
    gate_rejected_notice,
    gate_report,
    run_failed_notice,
    version_description,
)

RESULTS = {
    "base": {"task_exact_match": 0.1, "regression_perplexity": 30.0, "a_other": 1.0},
    "candidate": {"task_exact_match": 0.9, "regression_perplexity": 31.0},
}
PASSED = {"passed": True, "reasons": ["PASS: task gain +0.800 (needed >= 0.100)", "PASS: regression ok"]}
REJECTED = {"passed": False, "reasons": ["PASS: task gain +0.800", "FAIL: regression perplexity +40% (allowed 5%)"]}


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("gate", "My_Model/v2") == "gate-my-model-v2"
    assert artifact_key("comparison", "--x--") == "comparison-x"


def test_comparison_rows_put_the_headline_metrics_first_and_leave_gaps_empty():
    rows = comparison_rows(RESULTS)
    assert [row["metric"] for row in rows] == ["task_exact_match", "regression_perplexity", "a_other"]
    assert rows[0] == {"metric": "task_exact_match", "base": 0.1, "candidate": 0.9}
    assert "candidate" not in rows[2]


def test_the_gate_report_states_the_verdict_every_rule_the_table_and_the_link_without_credentials():
    report = gate_report("m", REJECTED, RESULTS, "http://alice:s3cret@mlflow:5000/#/experiments/1/runs/abc")
    assert report.startswith("# Gate REJECTED: m")
    assert "- FAIL: regression perplexity +40% (allowed 5%)" in report and "- PASS: task gain +0.800" in report
    assert "| task_exact_match | 0.1000 | 0.9000 |" in report and "| a_other | 1.0000 | - |" in report
    assert "s3cret" not in report and "/runs/abc" in report


def test_the_version_description_names_the_decision_the_headline_figure_and_the_run():
    passed = version_description(PASSED, RESULTS, "abc", "http://mlflow/#/experiments/1/runs/abc", "exact_match")
    assert passed.startswith("Gate PASSED. PASS: task gain +0.800")
    assert "task exact_match: base 0.1000, candidate 0.9000" in passed
    assert "[abc](http://mlflow/#/experiments/1/runs/abc)" in passed
    rejected = version_description(REJECTED, RESULTS, "abc", None, "exact_match")
    assert rejected.startswith("Gate REJECTED. FAIL: regression perplexity") and "MLflow run abc;" in rejected


def test_notices_name_the_model_the_reasons_and_never_a_secret():
    gate = gate_rejected_notice("m", REJECTED, None, "brave-fox")
    assert (gate.event, gate.resource["prefect.resource.id"]) == (GATE_REJECTED_EVENT, "lora-pipeline.model.m")
    assert "FAIL: regression perplexity" in gate.body and "brave-fox" in gate.body
    assert gate.payload["reasons"] == REJECTED["reasons"]
    failed = run_failed_notice("m", "ConnectionError: https://bob:hunter2@mlflow/api", "register", "brave-fox")
    assert failed.event == RUN_FAILED_EVENT and "in stage register" in failed.subject
    assert "hunter2" not in failed.body + str(failed.payload)
