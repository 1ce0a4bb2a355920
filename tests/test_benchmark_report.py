"""benchmarks/report.py: each benchmark's two sides, ratio and verdict (the figures in results/latest.md)."""

from __future__ import annotations

from benchmarks import report


def _pipeline_runs(recomputed: list[str]) -> dict:
    first = {"wall_seconds": 100.0, "non_compute_seconds": 40.0, "non_compute_share": 0.4}
    rerun = {"wall_seconds": 8.0, "non_compute_seconds": 8.0, "non_compute_share": 1.0}
    return {"runs": {"first": first, "rerun": rerun}, "rerun_recomputed": recomputed}


def test_pipeline_runs_states_both_ratios_against_their_targets():
    share, rerun = report.READERS["pipeline_runs.json"](_pipeline_runs([]))
    assert (share["ratio"], share["target"], share["met"]) == (0.4, "<= 0.15", False)
    assert share["sides"] == {"non-compute": 40.0, "wall": 100.0}
    assert (rerun["ratio"], rerun["target"], rerun["met"]) == (0.08, "<= 0.1", True)
    assert rerun["sides"] == {"re-run": 8.0, "first run": 100.0}


def test_a_rerun_that_computed_a_stage_again_does_not_meet_its_target():
    _, rerun = report.READERS["pipeline_runs.json"](_pipeline_runs(["train_qlora"]))
    assert rerun["ratio"] == 0.08 and rerun["met"] is False and rerun["recomputed"] == ["train_qlora"]


def test_the_markdown_table_lists_every_record_and_what_did_not_run():
    records = report.READERS["pipeline_runs.json"](_pipeline_runs([]))
    text = report.to_markdown({"measured": "now", "benchmarks": records, "missing": ["serving.json"],
                               "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2, "libraries": {"torch": "2"}}})
    assert "| 0.4 | <= 0.15 | **no** |" in text and "| 0.08 | <= 0.1 | yes |" in text
    assert text.rstrip().endswith("Not run: serving.json")


def test_training_on_the_real_model_reads_the_best_run_of_each_side():
    data = {"model": {"name": "SmolLM2", "repeats": 2},
            "best_tokens_per_second": {"pipeline": 97.5, "plain_trl": 93.0},
            "runs": {"memory_4bit": {"footprint_mb": 158.76}, "memory_fp32": {"footprint_mb": 513.13}}}
    speed, memory = report.READERS["training_smollm2/training.json"](data)
    assert (speed["ratio"], speed["met"]) == (1.048, True) and "best of 2" in speed["benchmark"]
    assert (memory["ratio"], memory["met"]) == (0.309, False)
