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


def test_training_on_the_27m_model_reads_the_best_run_of_each_side_for_speed_and_packing():
    data = {"model": {"repeats": 2}, "best_tokens_per_second": {"pipeline": 482.6, "plain_trl": 517.1},
            "model_flop_utilisation": 0.59, "model_flop_utilisation_grouped": 0.66,
            "runs": {"matmul_peak": {"gflops": 184.3}, "pipeline_packed": {"tokens_per_second": 924.5},
                     "memory_4bit": {"footprint_mb": 13.66}, "memory_fp32": {"footprint_mb": 104.66}}}
    speed, _, _, packing, _ = report.READERS["training/training.json"](data)
    assert (speed["ratio"], speed["met"]) == (0.933, False) and "best of 2" in speed["benchmark"]
    assert speed["sides"] == {"pipeline": 482.6, "plain_trl": 517.1}
    assert (packing["ratio"], packing["sides"]["unpacked"]) == (1.916, 482.6)


def test_the_two_training_sides_alternate_and_each_keeps_its_best_run(monkeypatch, tmp_path):
    from benchmarks import training

    order, speeds = [], iter([447.1, 456.4, 482.6, 517.1])
    monkeypatch.setattr(training, "_run_case", lambda args: order.append(args[0]) or
                        {"tokens_per_second": next(speeds), "dir": args[3]})
    runs, best = training.alternating_pairs(tmp_path / "model", tmp_path / "rows.jsonl", tmp_path, 30, 2)
    assert order == ["pipeline", "plain", "pipeline", "plain"]
    assert sorted(runs) == ["pipeline_0", "pipeline_1", "plain_trl_0", "plain_trl_1"]
    assert (best["pipeline"]["tokens_per_second"], best["plain_trl"]["tokens_per_second"]) == (482.6, 517.1)
    assert best["pipeline"]["dir"].endswith("pipeline-1")  # every run trains into a directory of its own
    assert len({run["dir"] for run in runs.values()}) == 4


def test_quality_over_several_seeds_reports_means_and_is_met_only_when_every_seed_is():
    def seed(qlora_ppl, lora_ppl, qlora_em, lora_em):
        return {"qlora": {"answer_perplexity": qlora_ppl, "exact_match": qlora_em},
                "lora": {"answer_perplexity": lora_ppl, "exact_match": lora_em},
                "answer_perplexity_qlora_over_lora": round(qlora_ppl / lora_ppl, 4),
                "exact_match_qlora_minus_lora_points": round((qlora_em - lora_em) * 100, 1)}
    seeds = {"0": seed(1.07, 1.05, 0.90, 0.94), "1": seed(1.04, 1.04, 0.93, 0.94)}
    data = {"tasks": {"smollm2": {"seeds": seeds, "answer_perplexity_qlora_over_lora": {"mean": 1.012},
                                  "exact_match_qlora_minus_lora_points": {"mean": -2.5}}}}
    perplexity, exact = report.READERS["quality.json"](data)
    assert (perplexity["ratio"], perplexity["met"]) == (1.012, True) and "2 seeds" in perplexity["benchmark"]
    assert perplexity["sides"] == {"qlora": 1.055, "lora": 1.045}
    assert (exact["ratio"], exact["met"]) == (-2.5, False)  # seed 1 is within 2 points, seed 0 is not
    one = report.READERS["quality.json"]({"tasks": {"demo": {"seeds": {"0": seeds["1"]},
                                                             "answer_perplexity_qlora_over_lora": 1.0,
                                                             "exact_match_qlora_minus_lora_points": -1.0}}})
    assert [record["met"] for record in one] == [True, True] and "1 seed," in one[0]["benchmark"]


def _durations(total: float, complete: bool = True) -> dict:
    steps = {"assets": {"seconds": 20.0, "ok": True}, "training": {"seconds": total - 320.0, "ok": True},
             "serving": {"seconds": 300.0, "ok": False}}
    return {"steps": steps, "total_seconds": total, "complete": complete, "budget_seconds": 1500}


def test_make_bench_is_judged_against_its_25_minute_budget_only_when_every_benchmark_ran():
    (over,) = report.READERS["bench_durations.json"](_durations(1800.0))
    assert (over["ratio"], over["target"], over["met"]) == (1.2, "<= 1.0", False)
    assert over["sides"] == {"make bench": 1800.0, "budget": 1500}
    (within,) = report.READERS["bench_durations.json"](_durations(1200.0))
    assert (within["ratio"], within["met"]) == (0.8, True)
    assert report.READERS["bench_durations.json"](_durations(60.0, complete=False)) == []


def test_the_markdown_breaks_the_bench_time_down_by_step_and_flags_a_failed_one():
    text = report.to_markdown({"measured": "now", "benchmarks": [], "missing": [], "durations": _durations(1800.0),
                               "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2, "libraries": {}}})
    assert "| assets | 0.3 | ok |" in text and "| training | 24.7 | ok |" in text
    assert "| serving | 5.0 | **failed** |" in text and "| total | 30.0 | |" in text


def test_runs_against_a_running_prefect_server_get_their_own_rows():
    data = {**_pipeline_runs([]), "with_running_server": _pipeline_runs([])}
    data["with_running_server"]["runs"]["rerun"] = {"wall_seconds": 12.0}
    rows = report.READERS["pipeline_runs.json"](data)
    assert len(rows) == 4 and all("running Prefect server" in row["benchmark"] for row in rows[2:])
    assert [(row["ratio"], row["met"]) for row in rows] == [(0.4, False), (0.08, True), (0.4, False), (0.12, False)]
