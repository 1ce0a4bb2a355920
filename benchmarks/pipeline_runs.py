"""The demo pipeline end to end, as `make demo` runs it: where its wall time goes, and what a re-run costs.

Two runs of ``lora-pipeline run --config configs/demo.yaml`` (the console script, each in its own process,
its own ephemeral Prefect server) on a fresh output directory: (a) the first run, (b) an identical re-run.
The demo world is *not* part of either: the pipeline caches it inside the output directory
(``<output_dir>/cache/demo-world/<spec hash>``), so a fresh directory would build it again (minutes). It is
taken from where an earlier build left it (``outputs/cache/demo-world`` after ``make demo``, or the test
suite's cache), linked into the fresh directory before run (a); without one it is built there first, untimed.

From each run's summary (``--summary-json``) and the runner's clock:

- wall time: the whole process, CLI start-up and the Prefect server's start included;
- per stage: wall seconds and compute seconds (the math: training steps, generation and scoring, merge
  and parity logits; see ``lora_pipeline/summary.py``); the rest is non-compute (model loads, Great
  Expectations, MLflow, Prefect, file I/O);
- outside the stages: start-up (process start -> flow body, split at the Prefect server's start and the
  flow run's begin from the log's timestamps), between stages (MLflow run, final logging) and teardown
  (summary written -> process exit);
- ratios (issue 12): non-compute share of run (a) = 1 - compute / wall (target <= 0.15); re-run wall /
  first-run wall (target <= 0.1).

With ``--with-server`` the two runs are made again, on a second fresh output directory, against a Prefect
server that is already running (``prefect server start`` on SQLite, as ``make up`` starts it; started before
and stopped after, untimed): what a team that keeps a server up (scheduled retrains, the Prefect UI) pays.
The CLI then starts no temporary server and stops none at exit. MLflow stays the runs' local SQLite store.

Usage: ``.venv/bin/python -m benchmarks.pipeline_runs [--out outputs/benchmarks] [--world-from DIR] [--with-server]``
Writes ``<out>/pipeline_runs.json`` (the runs' logs and summaries under ``<out>/pipeline_runs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
TARGETS = {"non_compute_share_first_run": 0.15, "rerun_over_first_run": 0.1}
#: The stages an identical re-run takes from the first run's records (summary status ``cached``).
COMPUTING = ("validate_data", "format_prompts", "train_qlora", "evaluate", "merge")
_LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \|")


def _world_candidates(extra: Path | None) -> list[Path]:
    """Where a built demo world may already be: given, `make demo`'s output dir, the test suite's cache."""
    test_cache = Path(os.environ.get("LORA_PIPELINE_TEST_CACHE", Path.home() / ".cache" / "lora-pipeline-tests"))
    found = [extra] if extra else []
    return [*found, REPO / "outputs" / "cache" / "demo-world", test_cache / "cache" / "demo-world"]


def seed_demo_world(output_dir: Path, extra: Path | None) -> dict:
    """Link an already built demo world into ``output_dir``'s cache (built first when there is none)."""
    from lora_pipeline.build_once import COMPLETE_MARKER
    from lora_pipeline.config_files import load_config

    spec = load_config(DEMO_CONFIG).demo
    target = output_dir / "cache" / "demo-world" / spec.spec_hash()
    source = next((root / spec.spec_hash() for root in _world_candidates(extra)
                   if (root / spec.spec_hash() / COMPLETE_MARKER).is_file()), None)
    built_here = source is None
    if built_here:  # untimed: the benchmark is about runs on a built world
        from lora_pipeline.demo_world import ensure_demo_world

        print("no built demo world found: building it once (minutes; not part of the measurement)", flush=True)
        source = ensure_demo_world(spec, REPO / "outputs" / "cache" / "demo-world").root

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)
    return {"spec_hash": spec.spec_hash(), "taken_from": str(source), "built_by_the_benchmark": built_here,
            "linked_into": str(target), "note": "the pipeline caches the world in <output_dir>/cache/demo-world"}


def _log_times(log: str, day: datetime) -> dict[str, float]:
    """Unix times of the Prefect server's start and the flow run's begin, from the log's HH:MM:SS.mmm stamps."""
    marks = {"prefect_server_start": "Starting temporary server", "flow_run_begin": "Beginning flow run"}
    found: dict[str, float] = {}
    for line in log.splitlines():
        stamp = _LOG_TIME.match(line)
        for name, text in marks.items():
            if stamp and name not in found and text in line:
                hour, minute, second, milli = (int(g) for g in stamp.groups())
                found[name] = day.replace(hour=hour, minute=minute, second=second, microsecond=milli * 1000).timestamp()
    return found


def run_demo(output_dir: Path, work: Path, name: str, api_url: str | None = None) -> dict:
    """One `lora-pipeline run` of the demo config in its own process (against ``api_url`` when given, else its
    own temporary Prefect server); its timings."""
    script = Path(sys.executable).with_name("lora-pipeline")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lora_pipeline.cli"]
    summary_path = work / f"{name}-summary.json"
    command += ["run", "--config", str(DEMO_CONFIG), "--set", f"output_dir={output_dir}",
                "--summary-json", str(summary_path)]
    # The code next to this file is what runs (the console script would import the installed checkout).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    ended = time.time()
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed ({done.returncode}); see {work / f'{name}.log'}:\n{done.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    return _timings(summary, started, summary_path.stat().st_mtime, ended,
                    _log_times(done.stderr + done.stdout, datetime.fromtimestamp(started)))


def _timings(summary: dict, started: float, written: float, ended: float, marks: dict[str, float]) -> dict:
    wall = ended - started
    stages = []
    for stage in summary["stages"]:
        compute = stage.get("compute_seconds", 0.0)
        stages.append({"name": stage["name"], "status": stage["status"], "seconds": stage["seconds"],
                       "compute_seconds": compute, "non_compute_seconds": round(stage["seconds"] - compute, 2),
                       "steps": stage.get("steps", {})})
    in_stages = sum(stage["seconds"] for stage in stages)
    compute = sum(stage["compute_seconds"] for stage in stages)
    flow_body = summary["started_at"]
    startup = {"total": flow_body - started}
    if {"prefect_server_start", "flow_run_begin"} <= set(marks):  # the server started after the imports
        startup.update({
            "cli_imports_config_preflight": marks["prefect_server_start"] - started,
            "prefect_server_start_and_flow_run": marks["flow_run_begin"] - marks["prefect_server_start"],
            "flow_body_setup": flow_body - marks["flow_run_begin"],
        })
    elif "flow_run_begin" in marks:  # the CLI starts the server while it imports (flows/temporary_api.py)
        startup.update({
            "cli_imports_config_preflight_and_prefect_server_start": marks["flow_run_begin"] - started,
            "flow_body_setup": flow_body - marks["flow_run_begin"],
        })
    outside = {"startup": {k: round(v, 2) for k, v in startup.items()},
               "between_stages": round(written - flow_body - in_stages, 2),
               "teardown": round(ended - written, 2)}
    train = summary.get("train", {})
    return {
        "wall_seconds": round(wall, 2), "compute_seconds": round(compute, 2),
        "non_compute_seconds": round(wall - compute, 2), "non_compute_share": round(1 - compute / wall, 4),
        "stages": stages, "outside_stages": outside,
        "training_loop": {"train_seconds": train.get("train_seconds"), "step_seconds": train.get("train_step_seconds"),
                          "steps": train.get("global_step")},
        "registered_model": summary.get("registered_model"), "aliases": summary.get("registry", {}).get("aliases"),
        "run_dir": summary["run_dir"],
    }


@contextmanager
def running_prefect_server(state: Path, port: int = 4281) -> Iterator[str]:
    """A Prefect server on loopback (SQLite under ``state``), as ``make up`` starts it; yields its API URL."""
    from infra.stack import prefect_server_command, start_service, stop_process_group, wait_healthy

    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    server = start_service("prefect-server", prefect_server_command(port), env, logs)
    try:
        wait_healthy(f"{api_url}/health", server, logs / "prefect-server.log", timeout=180)
        yield api_url
    finally:
        stop_process_group(server.pid)


def run_pair(output_dir: Path, work: Path, api_url: str | None = None) -> dict:
    """A first run and an identical re-run on ``output_dir``; both runs' timings and the ratios."""
    label = "" if api_url is None else " (running Prefect server)"
    first = run_demo(output_dir, work, "first", api_url)
    print(f"first run{label}: {first['wall_seconds']} s, non-compute share {first['non_compute_share']}", flush=True)
    rerun = run_demo(output_dir, work, "rerun", api_url)
    print(f"identical re-run{label}: {rerun['wall_seconds']} s", flush=True)
    share, ratio = first["non_compute_share"], round(rerun["wall_seconds"] / first["wall_seconds"], 4)
    recomputed = [s["name"] for s in rerun["stages"] if s["name"] in COMPUTING and s["status"] != "cached"]
    if recomputed:  # e.g. the pipeline's source changed between the runs (it is part of every stage's key)
        print(f"warning: the re-run computed {recomputed} again; see {work / 'rerun.log'}", flush=True)
    return {
        "output_dir": str(output_dir), "runs": {"first": first, "rerun": rerun}, "rerun_recomputed": recomputed,
        "ratios": {
            "non_compute_share_first_run": {"value": share, "target": f"<= {TARGETS['non_compute_share_first_run']}",
                                            "met": share <= TARGETS["non_compute_share_first_run"]},
            "rerun_over_first_run": {"value": ratio, "target": f"<= {TARGETS['rerun_over_first_run']}",
                                     "met": ratio <= TARGETS["rerun_over_first_run"],
                                     "sides": {"rerun": rerun["wall_seconds"], "first": first["wall_seconds"]}},
        },
    }


def _machine() -> dict:
    import platform
    from importlib.metadata import version

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "prefect", "mlflow")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--world-from", type=Path, default=None,
                        help="a demo-world cache dir (holding <spec hash>/) to take the built world from")
    parser.add_argument("--with-server", action="store_true",
                        help="also make both runs against an already running Prefect server (as after `make up`)")
    args = parser.parse_args()
    out = args.out.resolve()
    work = out / "pipeline_runs"
    shutil.rmtree(work, ignore_errors=True)  # the benchmark's own directory: a fresh output dir every time
    output_dir = work / "outputs"
    world = seed_demo_world(output_dir, args.world_from)
    results = {"machine": _machine(), "demo_world": world, **run_pair(output_dir, work)}
    if args.with_server:
        served = work / "with-server"
        served.mkdir()
        seed_demo_world(served / "outputs", args.world_from)
        with running_prefect_server(served / "stack") as api_url:
            results["with_running_server"] = {"api_url": api_url, **run_pair(served / "outputs", served, api_url)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_runs.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"temporary_server": results["ratios"],
                      "running_server": results.get("with_running_server", {}).get("ratios")}, indent=2))


if __name__ == "__main__":
    main()
