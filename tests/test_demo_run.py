"""The README's `make demo`, as a user runs it: the CLI on configs/demo.yaml, offline, from nothing.

This is the slowest test (the demo world is built from scratch, ~5 minutes on 2 cores); it checks
the demo's promises: the base model knows its regression skills and not the task, the candidate
learns the task without forgetting, and the registered model answers and stops at EOS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def _run_demo(output_dir: Path, summary: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lora_pipeline.cli", "run", "--config", str(DEMO_CONFIG),
               "--set", f"output_dir={output_dir}", "--summary-json", str(summary)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two demo runs on one output dir: the first builds the world, the second must reuse it."""
    root = tmp_path_factory.mktemp("demo")
    cwd = root / "cwd"
    cwd.mkdir()
    runs = []
    for attempt in ("first", "second"):
        summary_path = root / f"{attempt}.json"
        proc = _run_demo(root / "outputs", summary_path, cwd)
        assert proc.returncode == 0, f"{attempt} demo run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        runs.append(json.loads(summary_path.read_text()))
    return root, cwd, runs


def test_demo_meets_its_targets(demo):
    _, _, (first, _) = demo
    base, candidate = first["eval"]["base"], first["eval"]["candidate"]
    assert base["regression_exact_match"] >= 0.5, base
    assert base["task_exact_match"] <= 0.1, base
    assert candidate["task_exact_match"] >= 0.8, candidate
    assert first["gate"]["passed"] is True, first["gate"]
    assert base["regression_exact_match"] - candidate["regression_exact_match"] <= 0.1
    assert candidate["task_stop_rate"] == 1.0
    assert first["registered_model"]["version"] == "1" and first["registered_model"]["created"] is True


def test_second_demo_reuses_the_world_and_the_registered_version(demo):
    root, cwd, (first, second) = demo
    seconds = {s["name"]: s["seconds"] for s in second["stages"]}
    assert seconds["resolve_assets"] < 10, "the cached demo world was rebuilt"
    assert len([p for p in (root / "outputs" / "cache" / "demo-world").iterdir()]) == 1
    # Same config and data: the registry returns the existing version instead of a duplicate.
    assert second["registered_model"]["version"] == first["registered_model"]["version"]
    assert second["registered_model"]["created"] is False
    assert list(cwd.iterdir()) == []  # nothing written relative to the working directory


def test_registered_model_answers_a_held_out_task_prompt_and_stops(demo):
    import mlflow
    import mlflow.transformers
    import yaml

    root, _, (first, _) = demo
    max_new_tokens = yaml.safe_load(DEMO_CONFIG.read_text())["eval"]["max_new_tokens"]
    world = next((root / "outputs" / "cache" / "demo-world").iterdir())
    row = json.loads((world / "data" / "eval.jsonl").read_text().splitlines()[0])
    mlflow.set_tracking_uri(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    try:
        pipe = mlflow.transformers.load_model(first["registered_model"]["model_uri"], dst_path=str(root))
    finally:
        mlflow.set_tracking_uri(None)
    prompt, expected = row["messages"][:-1], row["messages"][-1]["content"]
    # Through the pipeline, as a user would call it (chat template applied by transformers).
    chat = pipe(prompt, max_new_tokens=max_new_tokens)[0]["generated_text"]
    assert " ".join(chat[-1]["content"].split()) == expected
    # And token by token, with only the saved generation config: it must stop at EOS within budget.
    tokenizer, model = pipe.tokenizer, pipe.model
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens)
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert tokenizer.eos_token_id in new_tokens and new_tokens.index(tokenizer.eos_token_id) < max_new_tokens - 1
    answer = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
    assert " ".join(tokenizer.decode(answer, skip_special_tokens=True).split()) == expected
