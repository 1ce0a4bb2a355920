"""A tiny model, a tracking store and one pipeline run to register into (shared by the registry test modules).

Module-scoped fixtures: a module imports them (``nothing_in_cwd`` is autouse there) and gets its own store,
built once per module (~3 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline import tracking
from lora_pipeline.config import RegistryConfig
from lora_pipeline.registry import RegisteredVersion, register_model
from tests.tiny_model import build_tiny_llama

REPO = Path(__file__).resolve().parents[2]
NAME = "tiny-llama"
LINEAGE = {"data_hash": "d41d8cd9", "config_hash": "0123abcd", "base_model": "builtin:demo",
           "flow_run_id": "flow-1", "git_commit": "deadbeef", "task_exact_match": "0.9"}
PROMPT = [{"role": "user", "content": "what is the capital of france?"}]


@pytest.fixture(autouse=True)
def nothing_in_cwd(mlflow_workdir):
    yield
    assert sorted(p.name for p in mlflow_workdir.iterdir()) == []  # no ./mlruns, no ./mlflow.db


@pytest.fixture(scope="module")
def env(mlflow_workdir, tmp_path_factory):
    """A tiny model + adapter dir, a tracking store and one pipeline run (built once: ~3 s)."""
    out = tmp_path_factory.mktemp("out")
    model = build_tiny_llama(out / "merged")
    adapter = out / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    uri = tracking.default_tracking_uri(out)
    run_id = tracking.start_pipeline_run(uri, "exp", out / "mlartifacts", "run", {})
    return {"out": out, "model": model, "adapter": adapter, "uri": uri, "run_id": run_id}


def register(env, run_key: str, name: str = NAME, tags=LINEAGE) -> RegisteredVersion:
    """Register ``env``'s tiny model under ``name`` for ``run_key``."""
    return register_model(
        tracking_uri=env["uri"], run_id=env["run_id"], model_dir=env["model"].path,
        registry_cfg=RegistryConfig(model_name=name), run_key=run_key, tags=tags,
        input_example=PROMPT, adapter_dir=env["adapter"],
    )


@pytest.fixture(scope="module")
def first(env):
    return register(env, "key-1")


def register_in_processes(env, name: str, run_keys: list[str], barrier) -> list[dict]:
    """Register once per run key, each in its own process, all released at once; their results."""
    barrier.mkdir()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.register_concurrently", env["uri"], env["run_id"],
         str(env["model"].path), name, key, str(barrier), str(len(run_keys))],
        cwd=barrier, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for key in run_keys]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
