"""Data-stage throughput and memory with the training tokenizer, at 1M and 5M short chat rows (issue 12 item 9).

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``: the whole
process, interpreter and imports included) is its own:

* ``stage_<n>``: ``lora_pipeline.data.validate_dataset`` with the tokenizer (every row normalised,
  de-duplicated, templated, tokenized and truncated as training will see it, every clean row
  GX-validated) on the first 1M and on all 5M rows of the same file;
* ``tokenizer_alone``: what a user would write to tokenize the same 1M rows and nothing else: read the
  JSONL, ``tokenizer.apply_chat_template(batch, tokenize=True)`` on batches of 1,000 conversations.
  Only the tokenizer calls are timed (reading and parsing the file is not), so this side is as fast
  as the tokenizer can be.

Ratios: stage rows/s at 1M / tokenizer-alone rows/s (target >= 0.5), and the stage's peak RSS at 5M /
at 1M (target <= 1.2: memory does not grow with the row count).

Usage: ``.venv/bin/python -m benchmarks.data_stage [--rows 1000000] [--large 5000000] [--text-rules] [--out DIR]``
Writes ``DIR/data_stage.json`` (default ``outputs/benchmarks``) and prints it. ``--large 0`` skips the
5M-row run (about 8 minutes of the default run's ~12); ``--text-rules`` adds a run without the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("red green blue black white river stone moon sun star fish bird tree road king ship "
         "cat dog fox owl house gold boat bear").split()
#: One line in this many is not JSON (quarantined: unparseable)...
BAD_EVERY = 1000
#: ...and one in this many repeats the row this many lines earlier (quarantined: duplicate).
DUPLICATE_EVERY, DUPLICATE_DISTANCE = 1000, 100_003
TOKENIZER_BATCH = 1000


def row(i: int) -> str:
    """Line ``i`` of the benchmark file (0-based), without its newline."""
    if i % BAD_EVERY == BAD_EVERY - 1:
        return "not json"
    if i % DUPLICATE_EVERY == 500 and i >= DUPLICATE_DISTANCE:
        i -= DUPLICATE_DISTANCE
        if i % BAD_EVERY == BAD_EVERY - 1:
            i -= 1
    a, b, c = WORDS[i % 24], WORDS[(i // 24) % 24], WORDS[(i // 576) % 24]
    # json.dumps of {"messages": [user, assistant]}, written out (the words need no escaping): 3x faster.
    return (f'{{"messages": [{{"role": "user", "content": "Translate {a} {b} {c} number {i}"}}, '
            f'{{"role": "assistant", "content": "{c} {b} {a} {i}"}}]}}')


def write_rows(path: Path, n_rows: int) -> int:
    """Write the first ``n_rows`` benchmark lines to ``path`` (kept when already complete); returns bytes."""
    marker = path.with_suffix(".complete")
    if not (path.is_file() and marker.is_file() and marker.read_text() == str(n_rows)):
        marker.unlink(missing_ok=True)
        with path.open("w", encoding="utf-8") as out:
            for start in range(0, n_rows, 100_000):
                out.write("".join(row(i) + "\n" for i in range(start, min(start + 100_000, n_rows))))
        marker.write_text(str(n_rows))
    return path.stat().st_size


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _load_tokenizer(directory: str) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _stage(source: Path, out_dir: Path, tokenizer_dir: str | None) -> dict:
    """Run the data stage once in this process; seconds, rows/s and peak RSS."""
    from lora_pipeline.config import DataConfig
    from lora_pipeline.data import validate_dataset

    tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    import great_expectations  # noqa: F401  # imported by the stage anyway: counted in the baseline below
    import pandas  # noqa: F401

    after_imports = _peak_mb()
    started = time.perf_counter()
    # What the pipeline passes (lora_pipeline.stages.check_data): the tokenizer's special tokens are text rules.
    special = list(tokenizer.all_special_tokens) if tokenizer is not None else []
    result = validate_dataset(DataConfig(min_rows=1, max_length=64), source, out_dir, tokenizer=tokenizer,
                              special_tokens=special)
    seconds = time.perf_counter() - started
    report = json.loads(result.report_path.read_text())
    return {"rows": result.n_input, "clean": result.n_clean, "quarantined": result.n_quarantined,
            "reason_counts": result.reason_counts, "success": result.success, "seconds": round(seconds, 1),
            "rows_per_second": round(result.n_input / seconds),
            "stage_reported_rows_per_second": report.get("rows_per_second"),
            "gx_chunks": json.loads((out_dir / "gx_validation_result.json").read_text())["meta"].get("chunks"),
            "peak_rss_mb": _peak_mb(), "rss_after_imports_mb": after_imports}


def _tokenizer_alone(source: Path, tokenizer_dir: str) -> dict:
    """Tokenize the file's conversations the plain way; only the tokenizer calls are timed."""
    tokenizer = _load_tokenizer(tokenizer_dir)
    rows = tokens = 0
    tokenizing = 0.0
    started = time.perf_counter()
    with source.open(encoding="utf-8") as handle:
        while True:
            batch = []
            for line in handle:
                try:
                    batch.append(json.loads(line)["messages"])
                except json.JSONDecodeError:
                    continue
                if len(batch) == TOKENIZER_BATCH:
                    break
            if not batch:
                break
            begin = time.perf_counter()
            encoded = tokenizer.apply_chat_template(batch, tokenize=True)
            tokenizing += time.perf_counter() - begin
            rows += len(batch)
            tokens += sum(len(ids) for ids in encoded["input_ids"])
    total = time.perf_counter() - started
    return {"rows": rows, "tokens": tokens, "tokenizer_seconds": round(tokenizing, 1),
            "rows_per_second": round(rows / tokenizing), "seconds_with_reading": round(total, 1),
            "rows_per_second_with_reading": round(rows / total), "peak_rss_mb": _peak_mb()}


def _build_tokenizer(directory: Path) -> None:
    from lora_pipeline.demo_world import DemoWorldSpec
    from lora_pipeline.demo_world.tokenizer import train_tokenizer

    texts = [" ".join(WORDS)] * 4 + [f"Translate number {i}" for i in range(1000)]
    train_tokenizer(texts, DemoWorldSpec(vocab_size=320)).save_pretrained(directory)


def _child(*args: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data_stage", "--_child", *args]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the main run and the tokenizer run")
    parser.add_argument("--large", type=int, default=5_000_000, help="rows of the memory-growth run (0: skip)")
    parser.add_argument("--text-rules", action="store_true", help="also run the stage without the tokenizer")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--_child", nargs=3, metavar=("WHAT", "SOURCE", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        what, source, arg = args._child
        if what == "tokenizer":
            print(json.dumps(_tokenizer_alone(Path(source), arg)))
        else:
            tokenizer_dir = None if what == "text_rules" else what
            print(json.dumps(_stage(Path(source), Path(arg), tokenizer_dir)))
        return

    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    _build_tokenizer(tokenizer_dir)
    sizes = [args.rows] + ([args.large] if args.large else [])
    files = {}
    for n_rows in sizes:  # the large file starts with the small one's rows, line for line
        files[n_rows] = work / f"chat-rows-{n_rows}.jsonl"
    results: dict = {"rows": args.large or args.rows, "small": args.rows, "runs": {},
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "input_mb": {n: round(write_rows(files[n], n) / 2**20, 1) for n in sizes}}
    started = time.perf_counter()

    def run(label: str, *child_args: str) -> dict:
        results["runs"][label] = _child(*child_args)
        print(label, json.dumps(results["runs"][label]), flush=True)
        return results["runs"][label]

    alone = run("tokenizer_alone", "tokenizer", str(files[args.rows]), str(tokenizer_dir))
    small = run(f"with_tokenizer_{args.rows}", str(tokenizer_dir), str(files[args.rows]),
                str(work / f"out-stage-{args.rows}"))
    results["stage_over_tokenizer_rows_per_second"] = round(small["rows_per_second"] / alone["rows_per_second"], 3)
    if args.large:
        large = run(f"with_tokenizer_{args.large}", str(tokenizer_dir), str(files[args.large]),
                    str(work / f"out-stage-{args.large}"))
        results["peak_rss_large_over_small"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        results["bytes_per_extra_row"] = round((large["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20
                                               / (args.large - args.rows), 1)
    if args.text_rules:
        run(f"text_rules_{args.rows}", "text_rules", str(files[args.rows]), str(work / f"out-text-{args.rows}"))
    results["targets"] = {"stage_over_tokenizer_rows_per_second": ">= 0.5", "peak_rss_large_over_small": "<= 1.2"}
    results["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    (work / "data_stage.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
