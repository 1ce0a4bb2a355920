"""Collect the benchmarks' results into one table: ``benchmarks/results/latest.json`` and ``latest.md``.

Each benchmark writes its own JSON under ``--out`` (``make bench`` runs them all first); this reads them,
states each measure's two sides, the ratio, the target and whether it is met, and records the machine
(CPU model, cores, torch threads, library versions). A benchmark that did not run is listed as missing.
Targets are those of issue 12.

Usage: ``.venv/bin/python -m benchmarks.report [--out outputs/benchmarks]``
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "mlflow", "prefect", "great_expectations")
_COMPARE = {">=": operator.ge, "<=": operator.le}


def _measure(name: str, numerator: tuple[str, float], denominator: tuple[str, float], target: str | None,
             ratio: float | None = None) -> dict:
    value = ratio if ratio is not None else numerator[1] / denominator[1]
    record = {"benchmark": name, "sides": {numerator[0]: numerator[1], denominator[0]: denominator[1]},
              "ratio": round(value, 3), "target": target}
    if target:
        op, bound = target.split()
        record["met"] = bool(_COMPARE[op](round(value, 3), float(bound)))
    return record


def _startup(data: dict) -> list[dict]:
    bare = data["import lora_pipeline"]["median_seconds"]
    return [_measure(f"CLI start-up: `{command}` vs `import lora_pipeline` (s)",
                     (command, data[command]["median_seconds"]), ("import lora_pipeline", bare), "<= 1.5")
            for command in ("lora-pipeline --help", "lora-pipeline show-config")]


def _evaluation(data: dict) -> list[dict]:
    seconds = data["median_seconds"]
    record = _measure(f"Evaluation generation, {data['model']}: one at a time / pipeline batched (s)",
                      ("one_at_a_time", seconds["one_at_a_time"]), ("pipeline", seconds["pipeline"]), ">= 3.0")
    record["met"] = record["met"] and not data["answers_differing"]  # the same greedy answers, or it is no win
    record["answers_differing"] = len(data["answers_differing"])
    return [record]


def _training(data: dict) -> list[dict]:
    runs, best = data["runs"], data["best_tokens_per_second"]
    return [
        _measure(f"Training tokens/s, 27M Llama: pipeline / plain TRL + PEFT (best of {data['model']['repeats']} "
                 "alternating repeats each)",
                 ("pipeline", best["pipeline"]), ("plain_trl", best["plain_trl"]), ">= 0.95"),
        _measure("Model FLOP utilisation, packed (vs the matmul peak measured in the run)",
                 ("model GFLOP/s", round(data["model_flop_utilisation"] * runs["matmul_peak"]["gflops"], 1)),
                 ("peak GFLOP/s", runs["matmul_peak"]["gflops"]), ">= 0.65", ratio=data["model_flop_utilisation"]),
        _measure("Model FLOP utilisation, unpacked with train.group_by_length",
                 ("model GFLOP/s", round(data["model_flop_utilisation_grouped"] * runs["matmul_peak"]["gflops"], 1)),
                 ("peak GFLOP/s", runs["matmul_peak"]["gflops"]), ">= 0.5",
                 ratio=data["model_flop_utilisation_grouped"]),
        _measure("Effective tokens/s: packing / none", ("packed", runs["pipeline_packed"]["tokens_per_second"]),
                 ("unpacked", best["pipeline"]), ">= 1.5"),
        _measure("Memory of the base: 4-bit / float32 (MB)", ("4-bit", runs["memory_4bit"]["footprint_mb"]),
                 ("float32", runs["memory_fp32"]["footprint_mb"]), "<= 0.3"),
    ]


def _data_stage(data: dict) -> list[dict]:
    small, large = data["small"], data["rows"]
    runs = data["runs"]
    records = [_measure(f"Data stage with the tokenizer / the tokenizer alone, {small:,} rows (rows/s)",
                        ("stage", runs[f"with_tokenizer_{small}"]["rows_per_second"]),
                        ("tokenizer alone", runs["tokenizer_alone"]["rows_per_second"]), ">= 0.5")]
    if large != small and f"with_tokenizer_{large}" in runs:
        records.append(_measure(f"Data stage peak RSS: {large:,} / {small:,} rows (MB)",
                                (f"{large} rows", runs[f"with_tokenizer_{large}"]["peak_rss_mb"]),
                                (f"{small} rows", runs[f"with_tokenizer_{small}"]["peak_rss_mb"]), "<= 1.2"))
    return records


def _serving(data: dict) -> list[dict]:
    rates = data["completion_tokens_per_second"]
    record = _measure(f"Serving, {data['model']}: completion tokens/s, {data['clients']} concurrent clients / one",
                      (f"{data['clients']} clients", rates["concurrent"]), ("one client", rates["one_client"]),
                      ">= 3.0")
    record["met"] = record["met"] and not data["answers_differing"]  # the same replies, or it is no win
    record["answers_differing"] = len(data["answers_differing"])
    return [record]


def _training_real(data: dict) -> list[dict]:
    name, runs = data["model"]["name"], data["runs"]
    return [
        _measure(f"Training tokens/s, {name}: pipeline / plain TRL + PEFT (best of {data['model']['repeats']} "
                 "alternating repeats each)",
                 ("pipeline", data["best_tokens_per_second"]["pipeline"]),
                 ("plain_trl", data["best_tokens_per_second"]["plain_trl"]), ">= 0.95"),
        _measure(f"Memory of the base, {name}: 4-bit / float32 (MB; the tied embedding stays float32)",
                 ("4-bit", runs["memory_4bit"]["footprint_mb"]), ("float32", runs["memory_fp32"]["footprint_mb"]),
                 "<= 0.3"),
    ]


def _mean(value: float | dict) -> float:
    """A per-task figure: the value of its one seed, or the mean over its seeds (``{"mean", "min", "max"}``)."""
    return value["mean"] if isinstance(value, dict) else value


def _quality(data: dict) -> list[dict]:
    records = []
    for task, result in data["tasks"].items():
        seeds = list(result["seeds"].values())
        label = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}, mean"

        def side(model: str, metric: str) -> float:
            return round(sum(seed[model][metric] for seed in seeds) / len(seeds), 4)

        perplexity = _measure(f"Quality, {task}: held-out answer perplexity, QLoRA / LoRA ({label})",
                              ("qlora", side("qlora", "answer_perplexity")), ("lora", side("lora", "answer_perplexity")),
                              "<= 1.05", ratio=_mean(result["answer_perplexity_qlora_over_lora"]))
        points = _mean(result["exact_match_qlora_minus_lora_points"])
        # Met only when every seed meets it (the benchmark's own verdict), not just their mean.
        perplexity["met"] = all(seed["answer_perplexity_qlora_over_lora"] <= 1.05 for seed in seeds)
        exact = {"benchmark": f"Quality, {task}: task exact match, QLoRA - LoRA (points, {label})",
                 "sides": {"qlora": side("qlora", "exact_match"), "lora": side("lora", "exact_match")},
                 "ratio": points, "target": "|x| <= 2",
                 "met": all(abs(seed["exact_match_qlora_minus_lora_points"]) <= 2 for seed in seeds)}
        records += [perplexity, exact]
    return records


def _pipeline_runs(data: dict) -> list[dict]:
    records = _run_pair(data, "")
    if "with_running_server" in data:  # `--with-server`: the same two runs against a Prefect server kept running
        records += _run_pair(data["with_running_server"], ", against a running Prefect server (as after `make up`)")
    return records


def _run_pair(data: dict, setting: str) -> list[dict]:
    first, rerun = data["runs"]["first"], data["runs"]["rerun"]
    records = [
        _measure(f"Demo run (a){setting}: non-compute share of its wall time, 1 - compute / wall (s)",
                 ("non-compute", first["non_compute_seconds"]), ("wall", first["wall_seconds"]), "<= 0.15",
                 ratio=first["non_compute_share"]),
        _measure(f"Demo{setting}: identical re-run / first run, wall time of the whole process (s)",
                 ("re-run", rerun["wall_seconds"]), ("first run", first["wall_seconds"]), "<= 0.1"),
    ]
    # A re-run that computed a stage again (the pipeline's source changed between the runs) measured nothing.
    records[1]["met"] = records[1]["met"] and not data["rerun_recomputed"]
    records[1]["recomputed"] = data["rerun_recomputed"]
    return records


def _durations(data: dict) -> list[dict]:
    """The whole `make bench` against its budget (only when every benchmark ran), assets included."""
    if not data.get("complete"):
        return []
    return [_measure("`make bench` wall time, shared assets included / the 25-minute budget (s)",
                     ("make bench", data["total_seconds"]), ("budget", data["budget_seconds"]), "<= 1.0")]


READERS = {"startup.json": _startup, "evaluation.json": _evaluation, "training/training.json": _training,
           "data_stage.json": _data_stage, "serving.json": _serving,
           "training_smollm2/training.json": _training_real, "quality.json": _quality,
           "pipeline_runs.json": _pipeline_runs, "bench_durations.json": _durations}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    import torch

    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = version(library.replace("_", "-"))
        except PackageNotFoundError:
            versions[library] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "libraries": versions}


def to_markdown(report: dict) -> str:
    lines = [f"# Benchmarks ({report['measured']})", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch threads "
             f"{report['machine']['torch_threads']}; " + ", ".join(
                 f"{k} {v}" for k, v in report["machine"]["libraries"].items() if v), "",
             "| benchmark | sides | ratio | target | met |", "|---|---|---|---|---|"]
    for record in report["benchmarks"]:
        sides = " / ".join(f"{name} {value}" for name, value in record["sides"].items())
        met = "" if record.get("target") is None else ("yes" if record["met"] else "**no**")
        lines.append(f"| {record['benchmark']} | {sides} | {record['ratio']} | {record.get('target') or ''} | {met} |")
    if report.get("durations"):
        steps = report["durations"]["steps"]
        lines += ["", "Where the time of `make bench` went (wall time of each step, in run order; `assets` builds the "
                  "converted SmolLM2 and the demo world when they are not cached yet):", "",
                  "| step | minutes | |", "|---|---|---|"]
        lines += [f"| {name} | {step['seconds'] / 60:.1f} | {'ok' if step['ok'] else '**failed**'} |"
                  for name, step in steps.items()]
        lines.append(f"| total | {report['durations']['total_seconds'] / 60:.1f} | |")
    if report["missing"]:
        lines += ["", "Not run: " + ", ".join(report["missing"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()
    benchmarks, missing = [], []
    for name, read in READERS.items():
        path = args.out / name
        if path.is_file():
            benchmarks += read(json.loads(path.read_text()))
        else:
            missing.append(name)
    report = {"measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "benchmarks": benchmarks, "missing": missing}
    durations = args.out / "bench_durations.json"
    if durations.is_file():
        report["durations"] = json.loads(durations.read_text())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "latest.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
