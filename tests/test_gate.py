"""The promotion gate is a pure function; every rule leaves a reason."""

from lora_pipeline.config import GateConfig
from lora_pipeline.gate import gate_candidate

GATE = GateConfig(min_task_gain=0.2, max_regression=0.1)
BASE = {"task_exact_match": 0.0, "regression_exact_match": 0.8}


def test_candidate_that_learned_and_kept_skills_passes():
    decision = gate_candidate(BASE, {"task_exact_match": 0.9, "regression_exact_match": 0.75}, GATE)
    assert decision.passed
    assert len(decision.reasons) == 2


def test_candidate_that_forgot_is_rejected_with_reason():
    decision = gate_candidate(BASE, {"task_exact_match": 0.9, "regression_exact_match": 0.5}, GATE)
    assert not decision.passed
    assert any("regression drop +0.300 > max_regression" in r for r in decision.reasons)


def test_candidate_that_learned_too_little_is_rejected():
    decision = gate_candidate(BASE, {"task_exact_match": 0.1, "regression_exact_match": 0.8}, GATE)
    assert not decision.passed
    assert any("task gain +0.100 < min_task_gain" in r for r in decision.reasons)


def test_missing_regression_suite_is_said_not_hidden():
    decision = gate_candidate({"task_exact_match": 0.0}, {"task_exact_match": 0.5}, GATE)
    assert decision.passed
    assert any("no regression suite" in r for r in decision.reasons)
