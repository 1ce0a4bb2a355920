"""The promotion gate is a pure function; every rule leaves a reason."""

from lora_pipeline.config import GateConfig
from lora_pipeline.gate import gate_candidate, resolve_task_metric

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
    assert "FAIL: regression drop (exact_match) +0.300 (allowed <= 0.100)" in decision.reasons


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


def test_free_form_task_metrics_gate_on_the_chosen_metric():
    base = {**BASE, "task_rouge_l": 0.40, "task_token_f1": 0.30}
    candidate = {**GOOD, "task_exact_match": 0.1, "task_rouge_l": 0.75, "task_token_f1": 0.45}
    assert not gate_candidate(base, candidate, GATE).passed  # on exact match it learned too little
    decision = gate_candidate(base, candidate, GATE, task_metric="rouge_l")
    assert decision.passed and "PASS: task gain (rouge_l) +0.350 (need >= 0.200)" in decision.reasons
    assert not gate_candidate(base, candidate, GATE, task_metric="token_f1").passed  # +0.15 < 0.2


def test_text_data_gates_on_the_relative_perplexity_reduction():
    assert resolve_task_metric(GateConfig(), "text") == "perplexity"
    assert resolve_task_metric(GateConfig(), "alpaca") == "exact_match"
    assert resolve_task_metric(GateConfig(task_metric="rouge_l"), "text") == "rouge_l"
    base, candidate = {"task_perplexity": 20.0}, {"task_perplexity": 12.0}
    decision = gate_candidate(base, candidate, GATE, task_metric="perplexity")
    assert decision.passed and "PASS: task gain (perplexity) +0.400 (need >= 0.200)" in decision.reasons
    assert not gate_candidate(base, {"task_perplexity": 18.0}, GATE, task_metric="perplexity").passed


def test_regression_drift_can_be_measured_robustly():
    # Against the base's own answers, exact match of long answers is brittle; ROUGE-L or perplexity are not.
    base = {**BASE, "regression_exact_match": 1.0, "regression_rouge_l": 1.0, "regression_perplexity": 40.0}
    candidate = {**GOOD, "regression_exact_match": 0.25, "regression_rouge_l": 0.7, "regression_perplexity": 41.0}
    assert not gate_candidate(base, candidate, GATE).passed
    by_rouge = GATE.model_copy(update={"regression_metric": "rouge_l", "max_regression": 0.4})
    assert "PASS: regression drop (rouge_l) +0.300 (allowed <= 0.400)" in gate_candidate(base, candidate, by_rouge).reasons
    by_ppl = GATE.model_copy(update={"regression_metric": "perplexity", "max_regression": 0.05})
    decision = gate_candidate(base, candidate, by_ppl)
    assert decision.passed and "PASS: regression drop (perplexity) +0.025 (allowed <= 0.050)" in decision.reasons
    worse = gate_candidate(base, {**candidate, "regression_perplexity": 48.0}, by_ppl)
    assert "FAIL: regression drop (perplexity) +0.200 (allowed <= 0.050)" in worse.reasons
