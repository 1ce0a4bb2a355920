"""The operations stack on this machine, one command: Prefect server, a Prefect worker, an MLflow server.

    python infra/stack.py up   [--dir outputs/stack] [--postgres postgresql://root@127.0.0.1:5432]
    python infra/stack.py down [--dir outputs/stack] [--drop]

``up`` starts, on loopback, a Prefect server (PostgreSQL database ``<prefix>_prefect``, created if missing;
SQLite under ``--dir`` without ``--postgres``), a worker polling the ``lora-pipeline`` process work pool
(from the repository root, with ``infra/prefect-worker.env``), and ``mlflow server`` (PostgreSQL database
``<prefix>_mlflow``, artifacts served from ``--dir/mlartifacts``). It waits for each to be healthy, keeps
every log under ``--dir/logs`` and writes ``--dir/env``: the ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI`` exports that point every ``lora-pipeline`` command at the stack. ``down`` stops
them (``--drop`` also drops the databases). ``make up`` / ``make down`` run these.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "lora-pipeline"
WORKER_ENV_FILE = REPO / "infra" / "prefect-worker.env"
POSTGRES_ENV = "LORA_PIPELINE_POSTGRES_URL"
#: How long the Prefect server may wait for a new database connection (see up(); Prefect's default is 5 s).
SERVER_DATABASE_CONNECTION_TIMEOUT_SECONDS = 30


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def prefect_server_command(port: int) -> list[str]:
    """``prefect server start`` on loopback at ``port``, as ``up`` runs it (its database comes from the environment)."""
    return [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def _worker_defaults() -> dict[str, str]:
    lines = WORKER_ENV_FILE.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _create_database(server_url: str, name: str, *, drop: bool = False) -> None:
    """CREATE (or DROP) DATABASE ``name`` on the PostgreSQL server at ``server_url`` (idempotent)."""
    import psycopg

    with psycopg.connect(f"{server_url.rstrip('/')}/postgres", autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if drop and exists:
            connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        elif not drop and not exists:
            connection.execute(f'CREATE DATABASE "{name}"')


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; exit with the tail of ``log`` if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not become healthy; see {log}:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def start_service(name: str, command: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """Start ``command`` from the repository root in its own session, its output appended to ``logs/<name>.log``."""
    log = logs / f"{name}.log"
    handle = log.open("ab")
    # Its own session: `down` stops the whole process group (uvicorn and gunicorn workers included).
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def prefect_server_env(base: dict[str, str], database_url: str, api_url: str) -> dict[str, str]:
    """The Prefect server's environment: ``base`` with its database and the API URL its UI gives the browser
    (this server's port, not Prefect's default 4200).

    A new database connection may wait ``SERVER_DATABASE_CONNECTION_TIMEOUT_SECONDS`` (Prefect's default, 5 s,
    counts the time its event loop is busy): ten runs starting at once on 2 slow cores made it time out, and a
    run's request for its model's concurrency slot got a 500 and failed. A timeout of the caller's own is kept.
    """
    env = {**base, "PREFECT_API_DATABASE_CONNECTION_URL": database_url, "PREFECT_UI_API_URL": api_url}
    if not {"PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "PREFECT_API_DATABASE_CONNECTION_TIMEOUT"} & env.keys():
        env["PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT"] = str(SERVER_DATABASE_CONNECTION_TIMEOUT_SECONDS)
    return env


def up(args: argparse.Namespace) -> dict[str, str]:
    """Start the three servers and return the exports that point clients at them."""
    state = Path(args.dir).expanduser().resolve()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if (state / "pids.json").exists():
        raise SystemExit(f"a stack already runs from {state} (python infra/stack.py down --dir {state})")
    postgres = args.postgres or os.environ.get(POSTGRES_ENV)
    if postgres:
        for suffix in ("prefect", "mlflow"):
            _create_database(postgres, f"{args.db_prefix}_{suffix}")
        prefect_db = f"postgresql+asyncpg://{postgres.split('://', 1)[1].rstrip('/')}/{args.db_prefix}_prefect"
        mlflow_db = f"postgresql+psycopg://{postgres.split('://', 1)[1].rstrip('/')}/{args.db_prefix}_mlflow"
    else:
        prefect_db = f"sqlite+aiosqlite:///{state / 'prefect.db'}"
        mlflow_db = f"sqlite:///{state / 'mlflow.db'}"
    api_url = f"http://127.0.0.1:{args.prefect_port}/api"
    tracking_url = f"http://127.0.0.1:{args.mlflow_port}"
    base = {**os.environ, **_worker_defaults(), "PREFECT_HOME": str(state / "prefect-home")}
    pids = {}
    server_env = prefect_server_env(base, prefect_db, api_url)
    server = start_service("prefect-server", prefect_server_command(args.prefect_port), server_env, logs)
    pids["prefect-server"] = server.pid
    # MLflow 3's job runner (GenAI judges and optimisation: seven huey consumer processes) is not used here.
    mlflow = start_service("mlflow-server",
                           [_bin("mlflow"), "server", "--backend-store-uri", mlflow_db, "--serve-artifacts",
                            "--artifacts-destination", str(state / "mlartifacts"), "--host", "127.0.0.1",
                            "--port", str(args.mlflow_port), "--workers", "1"],
                           {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, logs)
    pids["mlflow-server"] = mlflow.pid
    (state / "pids.json").write_text(json.dumps(pids))
    wait_healthy(f"{api_url}/health", server, logs / "prefect-server.log", args.timeout)
    wait_healthy(f"{tracking_url}/health", mlflow, logs / "mlflow-server.log", args.timeout)
    clients = {"PREFECT_API_URL": api_url, "MLFLOW_TRACKING_URI": tracking_url}
    worker_env = {**base, **clients}
    if args.config_roots:
        worker_env["LORA_PIPELINE_CONFIG_ROOTS"] = args.config_roots
    worker = start_service("prefect-worker", [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type",
                                              "process", "--name", f"{WORK_POOL}-local"], worker_env, logs)
    pids["prefect-worker"] = worker.pid
    (state / "pids.json").write_text(json.dumps(pids))
    _wait_worker(api_url, worker, logs / "prefect-worker.log", args.timeout)
    (state / "env").write_text("".join(f"export {key}={value}\n" for key, value in clients.items()))
    print(f"stack up ({'PostgreSQL' if postgres else 'SQLite'}); logs in {logs}; point clients at it with:\n"
          f"  source {state / 'env'}", flush=True)
    return clients


def _wait_worker(api_url: str, worker: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until the work pool lists an online worker (the worker creates the pool on start)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{api_url}/work_pools/{WORK_POOL}/workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if any(worker_["status"] == "ONLINE" for worker_ in json.loads(response.read())):
                    return
        except OSError:  # 404 until the worker has created its pool
            pass
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not come online; see {log}:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def down(args: argparse.Namespace) -> None:
    """Stop every process of the stack (process groups: TERM, then KILL after 20 s) and forget it."""
    state = Path(args.dir).expanduser().resolve()
    pids_file = state / "pids.json"
    if not pids_file.exists():
        print(f"no stack runs from {state}")
        return
    pids = json.loads(pids_file.read_text())
    for pid in reversed(list(pids.values())):  # the worker first, then the servers
        stop_process_group(pid)
    pids_file.unlink()
    postgres = args.postgres or os.environ.get(POSTGRES_ENV)
    if args.drop and postgres:
        for suffix in ("prefect", "mlflow"):
            _create_database(postgres, f"{args.db_prefix}_{suffix}", drop=True)
    print(f"stack down ({', '.join(pids)})")


def stop_process_group(pid: int) -> None:
    """TERM the process group led by ``pid``; KILL it if it is still there after 20 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/stack.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", default=str(REPO / "outputs" / "stack"), help="state, logs and artifacts")
    parser.add_argument("--postgres", default=None, help=f"PostgreSQL server URL (default ${POSTGRES_ENV}; "
                        "unset: SQLite)")
    parser.add_argument("--db-prefix", default="lora_pipeline", help="databases <prefix>_prefect, <prefix>_mlflow")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--config-roots", default=None,
                        help="extra directories runs may read config files from (the worker's environment)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds each server may take to be healthy")
    parser.add_argument("--drop", action="store_true", help="down: also drop the PostgreSQL databases")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args)
    else:
        down(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
