"""Data-stage throughput and memory on a large JSONL of short chat rows (issue: bounded memory, rows/s).

Each configuration runs in a fresh subprocess so its peak resident memory is its own. Two sizes are
measured side by side: if the stage streams, peak memory grows by a small fixed cost per row (typed
profile columns + one fingerprint), not by the size of the text.

Usage: ``.venv/bin/python -m benchmarks.data_stage [--rows 1000000] [--small 100000] [--out DIR]``
Writes ``DIR/data_stage.json`` (default ``outputs/benchmarks``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("red green blue black white river stone moon sun star fish bird tree road king ship "
         "cat dog fox owl house gold boat bear").split()


def write_rows(path: Path, n_rows: int) -> int:
    """``n_rows`` distinct short messages rows (a few duplicates and bad lines mixed in); returns bytes."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(n_rows):
            if i % 1000 == 999:
                out.write("not json\n")  # quarantined: unparseable
                continue
            a, b, c = WORDS[i % 24], WORDS[(i // 24) % 24], WORDS[(i // 576) % 24]
            row = {"messages": [{"role": "user", "content": f"Translate {a} {b} {c} number {i}"},
                                {"role": "assistant", "content": f"{c} {b} {a} {i}"}]}
            out.write(json.dumps(row) + "\n")
    return path.stat().st_size


def _measure(source: Path, out_dir: Path, tokenizer_dir: str | None) -> dict:
    """Run the stage once in this process; return seconds, rows/s and peak RSS."""
    from lora_pipeline.config import DataConfig
    from lora_pipeline.data import validate_dataset

    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    import great_expectations  # noqa: F401  # a fixed ~170 MB import, not the stage's per-row cost
    import pandas  # noqa: F401

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = validate_dataset(DataConfig(min_rows=1, max_length=64), source, out_dir, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = json.loads(result.report_path.read_text())
    return {"rows": result.n_input, "clean": result.n_clean, "quarantined": result.n_quarantined,
            "success": result.success, "seconds": round(seconds, 1),
            "rows_per_second": round(result.n_input / seconds), "stage_reported_rows_per_second":
            report.get("rows_per_second"), "peak_rss_mb": round(peak_kb / 1024, 1),
            "rss_after_imports_mb": round(baseline_kb / 1024, 1)}


def _build_tokenizer(directory: Path) -> None:
    from lora_pipeline.demo_world import DemoWorldSpec
    from lora_pipeline.demo_world.tokenizer import train_tokenizer

    texts = [" ".join(WORDS)] * 4 + [f"Translate number {i}" for i in range(1000)]
    train_tokenizer(texts, DemoWorldSpec(vocab_size=320)).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--_child", nargs=3, metavar=("SOURCE", "OUT", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        source, out, tokenizer_dir = args._child
        print(json.dumps(_measure(Path(source), Path(out), None if tokenizer_dir == "-" else tokenizer_dir)))
        return

    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    _build_tokenizer(tokenizer_dir)
    results: dict = {"rows": args.rows, "small": args.small, "runs": {}}
    for n_rows in (args.small, args.rows):
        source = work / f"rows-{n_rows}.jsonl"
        results[f"input_mb_{n_rows}"] = round(write_rows(source, n_rows) / 2**20, 1)
        for label, tok in (("text_rules", "-"), ("with_tokenizer", str(tokenizer_dir))):
            cmd = [sys.executable, "-m", "benchmarks.data_stage", "--_child", str(source),
                   str(work / f"out-{label}-{n_rows}"), tok]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results["runs"][f"{label}_{n_rows}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(label, n_rows, results["runs"][f"{label}_{n_rows}"], flush=True)
    for label in ("text_rules", "with_tokenizer"):
        small, large = results["runs"][f"{label}_{args.small}"], results["runs"][f"{label}_{args.rows}"]
        growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / (args.rows - args.small)
        results[f"{label}_bytes_per_extra_row"] = round(growth)
        # What the stage itself added on top of the interpreter and its imports, against the input size.
        stage_mb = large["peak_rss_mb"] - large["rss_after_imports_mb"]
        results[f"{label}_stage_memory_mb_{args.rows}"] = round(stage_mb, 1)
        results[f"{label}_stage_memory_over_input_size"] = round(stage_mb / results[f"input_mb_{args.rows}"], 3)
    (work / "data_stage.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
