"""``make bench``: every benchmark of issue 12, one after the other, each timed; then the report.

The shared assets come first, timed on their own: the converted SmolLM2 and the demo world, built once into
``benchmarks.evaluation.CACHE`` (where the test suite keeps them too) and only read by the benchmarks after.
On a fresh machine they take minutes (the demo world ~4, SmolLM2 ~1); once cached, seconds. Then each
benchmark runs in its own interpreter, so no benchmark inherits another's imports, threads or memory.

Each one's wall time goes to ``<out>/bench_durations.json``, which ``benchmarks.report`` turns into the
"make bench wall time" row (target: under 25 minutes on 2 cores) and a per-benchmark breakdown: where the
time of the run goes. A benchmark that fails is recorded as failed; the others still run, the report still
lists what ran, and the exit code is 1.

Usage: ``.venv/bin/python -m benchmarks.all [--out outputs/benchmarks] [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: In run order: the name of each benchmark, and its module with its arguments (``--out`` is added).
#: Quality runs one seed on both tasks here, without the context scores (`make bench-quality` has them).
BENCHMARKS: dict[str, list[str]] = {
    "startup": ["benchmarks.startup"],
    "evaluation": ["benchmarks.evaluation"],
    "training": ["benchmarks.training"],
    "data_stage": ["benchmarks.data_stage"],
    "serving": ["benchmarks.serving"],
    "pipeline_runs": ["benchmarks.pipeline_runs", "--with-server"],
    "quality": ["benchmarks.quality", "--tasks", "demo", "smollm2", "--seeds", "0", "--no-context"],
}
DURATIONS = "bench_durations.json"
#: The whole of `make bench`, assets included (issue 12).
BUDGET_SECONDS = 25 * 60


def build_assets() -> dict:
    """The converted SmolLM2 and the demo world, in the shared cache (built only when absent)."""
    from benchmarks.evaluation import CACHE, real_model_dir
    from benchmarks.pipeline_runs import DEMO_CONFIG
    from lora_pipeline.config_files import load_config
    from lora_pipeline.demo_world import ensure_demo_world

    model = real_model_dir(CACHE)
    world = ensure_demo_world(load_config(DEMO_CONFIG).demo, CACHE / "cache" / "demo-world")
    return {"smollm2": str(model), "demo_world": str(world.root)}


def run(name: str, command: list[str], out: Path) -> dict:
    """One benchmark in a fresh interpreter; its wall time and whether it succeeded."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *command, "--out", str(out)], check=False)
    seconds = round(time.perf_counter() - started, 1)
    print(f"== {name}: {'done' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} in {seconds} s",
          flush=True)
    return {"seconds": seconds, "ok": done.returncode == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None,
                        help="run only these (the durations file then says so, and no total is judged)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    assets = build_assets()
    steps = {"assets": {"seconds": round(time.perf_counter() - started, 1), "ok": True, **assets}}
    for name, command in BENCHMARKS.items():
        if args.only is None or name in args.only:
            steps[name] = run(name, command, out)
    durations = {"steps": steps, "total_seconds": round(time.perf_counter() - started, 1),
                 "complete": args.only is None, "budget_seconds": BUDGET_SECONDS}
    (out / DURATIONS).write_text(json.dumps(durations, indent=2))
    report = subprocess.run([sys.executable, "-m", "benchmarks.report", "--out", str(out)], check=False)
    failed = [name for name, step in steps.items() if not step["ok"]]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1 if failed or report.returncode else 0)


if __name__ == "__main__":
    main()
