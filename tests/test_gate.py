"""The promotion gate is a pure function; every rule leaves a reason."""

from lora_pipeline.config import GateConfig
from lora_pipeline.gate import gate_candidate

GATE = GateConfig(min_task_gain=0.2, max_regression=0.1, min_stop_rate=0.9)
BASE = {"task_exact_match": 0.0, "regression_exact_match": 0.8}
GOOD = {"task_exact_match": 0.9, "regression_exact_match": 0.75, "task_stop_rate": 1.0, "regression_stop_rate": 0.95}


def test_candidate_that_learned_and_kept_skills_passes():
    decision = gate_candidate(BASE, GOOD, GATE)
    assert decision.passed
    # task gain, regression, two stop rates, and the (absent) champion: all said.
    assert len(decision.reasons) == 5
    assert all(r.startswith(("PASS", "SKIP")) for r in decision.reasons)


def test_candidate_that_forgot_is_rejected_with_reason():
    decision = gate_candidate(BASE, {**GOOD, "regression_exact_match": 0.5}, GATE)
    assert not decision.passed
    assert "FAIL: regression drop +0.300 (allowed <= 0.100)" in decision.reasons


def test_candidate_that_learned_too_little_is_rejected():
    decision = gate_candidate(BASE, {**GOOD, "task_exact_match": 0.1}, GATE)
    assert not decision.passed
    assert "FAIL: task gain (exact_match) +0.100 (need >= 0.200)" in decision.reasons


def test_candidate_that_does_not_stop_is_rejected():
    decision = gate_candidate(BASE, {**GOOD, "regression_stop_rate": 0.5}, GATE)
    assert not decision.passed
    assert "FAIL: regression_stop_rate 0.500 (need >= 0.900)" in decision.reasons
    assert "PASS: task_stop_rate 1.000 (need >= 0.900)" in decision.reasons


def test_candidate_worse_than_the_champion_is_rejected():
    champion = {"task_exact_match": 0.95, "regression_exact_match": 0.7}
    decision = gate_candidate(BASE, GOOD, GATE, champion=champion)
    assert not decision.passed
    assert "FAIL: task_exact_match vs champion -0.050 (allowed >= 0.000)" in decision.reasons
    assert "PASS: regression_exact_match vs champion +0.050 (allowed >= 0.000)" in decision.reasons
    tolerant = gate_candidate(BASE, GOOD, GATE.model_copy(update={"champion_tolerance": 0.05}), champion=champion)
    assert tolerant.passed


def test_missing_regression_suite_is_said_not_hidden():
    decision = gate_candidate({"task_exact_match": 0.0}, {"task_exact_match": 0.5}, GATE)
    assert decision.passed
    assert any("no regression suite" in r for r in decision.reasons)
