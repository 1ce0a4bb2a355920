"""One operations stack per test session (`make up` on free ports and fresh PostgreSQL databases), shared by
the operations, load and browser tests: starting it costs ~15 s and two databases, so it is started once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers.serving import free_port

REPO = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get("LORA_PIPELINE_POSTGRES_URL", "postgresql://root@127.0.0.1:5432")


@contextmanager
def running_stack(state: Path, config_root: Path) -> Iterator[dict[str, Any]]:
    """`make up`, give ``{"state": dir, "PREFECT_API_URL": ..., "MLFLOW_TRACKING_URI": ...}``, `make down --drop`."""
    args = (f"--dir {state} --db-prefix lp_{uuid.uuid4().hex[:10]} --prefect-port {free_port()} "
            f"--mlflow-port {free_port()} --config-roots {config_root}")
    make = ["make", "--no-print-directory", "-C", str(REPO), f"POSTGRES_URL={POSTGRES}", f"STACK_ARGS={args}"]
    up = subprocess.run([*make, "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    exports = dict(line.removeprefix("export ").split("=", 1) for line in (state / "env").read_text().splitlines())
    try:
        yield {"state": state, **exports}
    finally:
        subprocess.run([*make, "down", f"STACK_ARGS={args} --drop"], capture_output=True, timeout=120)
        assert not (state / "pids.json").exists()


def deploy(stack: dict[str, Any]) -> None:
    """`lora-pipeline deploy` (prefect.yaml) against the stack's Prefect server."""
    env = {**os.environ, "PREFECT_API_URL": stack["PREFECT_API_URL"], "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "lora_pipeline.cli", "deploy"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def prefect_call(stack: dict[str, Any], coroutine_factory: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run a Prefect client coroutine against the stack's API."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        with temporary_settings({PREFECT_API_URL: stack["PREFECT_API_URL"]}):
            async with get_client() as client:
                return await coroutine_factory(client)

    return asyncio.run(main())


async def wait_for_flow_run(client: Any, flow_run_id: Any, timeout: float = 600) -> Any:
    """Poll until the flow run is in a final state; return that state."""
    import time

    deadline = time.monotonic() + timeout
    while not (state := (await client.read_flow_run(flow_run_id)).state).is_final():
        assert time.monotonic() < deadline, f"flow run {flow_run_id} did not finish in {timeout} s"
        await asyncio.sleep(2)
    return state
