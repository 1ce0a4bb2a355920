"""The README's `make demo`, as a user runs it: the CLI on configs/demo.yaml, offline, from nothing.

This is the slowest test (the demo world is built from scratch, ~5 minutes on 2 cores); it checks
the demo's promises: the base model knows its regression skills and not the task, the candidate
learns the task without forgetting, the registered model answers and stops at EOS, an over-trained
candidate that forgets is rejected by the gate, and `serve` answers for the champion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

from tests.helpers.cpu_turns import exclusive_cpu, without_thread_caps

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def _run_demo(output_dir: Path, summary: Path, cwd: Path, *extra: str, exclusive: bool = False
              ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lora_pipeline.cli", "run", "--config", str(DEMO_CONFIG),
               "--set", f"output_dir={output_dir}", "--summary-json", str(summary), *extra]
    env = {**(without_thread_caps(dict(os.environ)) if exclusive else os.environ), "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two demo runs on one output dir: the first builds the world, the second must reuse it.

    The first run has the CPU to itself, on all its threads (tests/helpers/cpu_turns.py): its world
    pre-trains on two threads, which another worker's test on the other core would slow many times over.
    """
    root = tmp_path_factory.mktemp("demo")
    cwd = root / "cwd"
    cwd.mkdir()
    runs = []
    for attempt in ("first", "second"):
        summary_path = root / f"{attempt}.json"
        with exclusive_cpu() if attempt == "first" else nullcontext():
            proc = _run_demo(root / "outputs", summary_path, cwd, exclusive=attempt == "first")
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


def test_second_demo_reuses_the_world_every_result_and_the_registered_version(demo):
    root, cwd, (first, second) = demo
    seconds = {s["name"]: s["seconds"] for s in second["stages"]}
    assert seconds["resolve_assets"] < 10, "the cached demo world was rebuilt"
    assert len([p for p in (root / "outputs" / "cache" / "demo-world").iterdir()]) == 1
    # An identical re-run: every computing stage takes the first run's results (same inputs by content),
    # computes nothing, and the decision is the same.
    status = {s["name"]: s["status"] for s in second["stages"]}
    assert [status[name] for name in ("validate_data", "format_prompts", "train_qlora", "evaluate", "merge")] == \
        ["cached"] * 5
    assert sum(s.get("compute_seconds", 0.0) for s in second["stages"]) == 0.0
    assert (second["eval"], second["gate"]) == (first["eval"], first["gate"])
    # Same config and data: the registry returns the existing version instead of a duplicate; aliases stay.
    assert second["registered_model"] == {**first["registered_model"], "created": False}
    assert second["registry"]["aliases"] == first["registry"]["aliases"] == {"candidate": "1", "champion": "1"}
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


@pytest.fixture(scope="module")
def overtrained(demo):
    """A third run on the same world with a 10x learning rate: it learns the task and forgets skills."""
    root, cwd, _ = demo
    summary_path = root / "overtrained.json"
    proc = _run_demo(root / "outputs", summary_path, cwd, "--set", "train.learning_rate=1e-2")
    # Its own exit code: the run completed, the gate said no (not 0, not a failure's 1).
    assert proc.returncode == 3, f"over-trained run:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "gate rejected the candidate" in proc.stderr
    return json.loads(summary_path.read_text())


def test_gate_rejects_an_overtrained_candidate_that_forgets(demo, overtrained):
    root, _, (first, _) = demo
    candidate = overtrained["eval"]["candidate"]
    assert candidate["task_exact_match"] >= 0.8  # it did learn the task...
    assert overtrained["eval"]["base"]["regression_exact_match"] - candidate["regression_exact_match"] > 0.1
    assert overtrained["gate"]["passed"] is False
    assert any(r.startswith("FAIL: regression drop") for r in overtrained["gate"]["reasons"])
    # Only what reads the learning rate ran again: the data stages and the base's scores are the first run's.
    stages = {s["name"]: s for s in overtrained["stages"]}
    assert (stages["validate_data"]["status"], stages["train_qlora"]["status"]) == ("cached", "completed")
    assert stages["evaluate"]["steps"]["evaluate-base"]["reused_from"] == first["run_dir"]
    assert stages["evaluate"]["steps"]["evaluate-candidate"]["reused_from"] is None
    # Compared with the serving champion (the demo candidate, version 1) too, on the same suites.
    assert overtrained["champion"]["version"] == "1"
    assert any(r.startswith("FAIL: regression_exact_match vs champion") for r in overtrained["gate"]["reasons"])
    # Its record is complete (version 2 with the decision in its tags) but it gets no alias.
    assert overtrained["registered_model"]["version"] == "2"
    assert overtrained["registry"] == {"aliases": {"candidate": "1", "champion": "1"}, "promoted": False}
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    tags = client.get_model_version("lora-pipeline-demo", "2").tags
    assert tags["gate_passed"] == "False" and "FAIL: regression drop" in tags["gate_reasons"]


def test_serve_answers_a_chat_request_for_the_champion_and_stops(demo, overtrained):
    """`lora-pipeline serve lora-pipeline-demo@champion` as a user starts it, queried over HTTP."""
    from tests.helpers.serving import http, served

    root, cwd, _ = demo
    world = next((root / "outputs" / "cache" / "demo-world").iterdir())
    row = json.loads((world / "data" / "eval.jsonl").read_text().splitlines()[0])
    with served("lora-pipeline-demo@champion", cwd, "--config", str(DEMO_CONFIG),
                "--set", f"output_dir={root / 'outputs'}") as (url, health):
        # The champion is still version 1: the over-trained version 2 failed the gate.
        assert health == {"status": "ok", "model": "lora-pipeline-demo@champion", "name": "lora-pipeline-demo",
                          "alias": "champion", "version": "1"}
        reply = http("POST", f"{url}/v1/chat/completions", {"messages": row["messages"][:-1], "max_tokens": 32})
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop"  # ended at EOS, within the budget
        assert " ".join(choice["message"]["content"].split()) == row["messages"][-1]["content"]
