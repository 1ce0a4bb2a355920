"""Stage records: what a re-run takes from an earlier run, keyed by content, checked before use.

The flow-level behaviour (an identical re-run computes nothing and registers no new version; a changed
input recomputes what depends on it): tests/test_flow_e2e.py and the demo's second run in
tests/test_demo_run.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from lora_pipeline import stage_inputs
from lora_pipeline.config_files import load_config
from lora_pipeline.reuse import EXECUTION, StageRecord, content_digest, execution, reused_or_computed
from lora_pipeline.summary import RunSummary
from tests.helpers.configs import write_tiny_config


def _run_dir(root: Path, name: str) -> Path:
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    return run_dir


def _stage(run_dir: Path, calls: list[str]):
    """A stage that writes two files and returns their paths (what the real stages do)."""
    def compute() -> dict:
        calls.append(run_dir.name)
        (run_dir / "out" / "deep").mkdir(parents=True)
        (run_dir / "out" / "rows.jsonl").write_text('{"a": 1}\n')
        (run_dir / "out" / "deep" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
        return {"rows": str(run_dir / "out" / "rows.jsonl"), "n": 1, "nested": [str(run_dir / "out")],
                EXECUTION: execution(1.5)}
    return compute


def test_a_second_run_with_the_same_inputs_gets_the_files_in_its_own_directory(tmp_path):
    calls: list[str] = []
    first, second = _run_dir(tmp_path, "first"), _run_dir(tmp_path, "second")
    inputs = {"data": "sha-of-rows", "settings": {"lr": 1e-3}}
    computed = reused_or_computed(tmp_path, "stage", inputs, first, _stage(first, calls), [first / "out"])
    reused = reused_or_computed(tmp_path, "stage", inputs, second, _stage(second, calls), [second / "out"])
    assert calls == ["first"]
    assert computed[EXECUTION] == {"compute_seconds": 1.5, "reused_from": None}
    assert reused[EXECUTION] == {"compute_seconds": 0.0, "reused_from": str(first)}
    # Paths point into the new run's own directory, never into the earlier one's.
    assert reused["rows"] == str(second / "out" / "rows.jsonl") and reused["nested"] == [str(second / "out")]
    assert (second / "out" / "deep" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    # Deleting the earlier run's directory leaves the record whole: the files are links, not references.
    shutil.rmtree(first)
    third = _run_dir(tmp_path, "third")
    assert reused_or_computed(tmp_path, "stage", inputs, third, _stage(third, calls), [third / "out"])["n"] == 1
    assert calls == ["first"] and (third / "out" / "rows.jsonl").is_file()


def test_any_changed_input_computes_and_says_which(tmp_path, caplog):
    calls: list[str] = []
    first, second = _run_dir(tmp_path, "first"), _run_dir(tmp_path, "second")
    reused_or_computed(tmp_path, "stage", {"data": "a", "lr": 1}, first, _stage(first, calls), [first / "out"])
    with caplog.at_level(logging.INFO, logger="lora_pipeline.reuse"):
        result = reused_or_computed(tmp_path, "stage", {"data": "a", "lr": 2}, second, _stage(second, calls),
                                    [second / "out"])
    assert calls == ["first", "second"] and result[EXECUTION]["reused_from"] is None
    assert "inputs changed since the last record: lr" in caplog.text


@pytest.mark.parametrize("damage", ["deleted", "changed", "record gone"])
def test_a_record_with_a_missing_or_changed_file_is_never_used_and_is_replaced(tmp_path, damage):
    calls: list[str] = []
    inputs = {"data": "a"}
    first = _run_dir(tmp_path, "first")
    reused_or_computed(tmp_path, "stage", inputs, first, _stage(first, calls), [first / "out"])
    record = StageRecord.at(tmp_path, "stage", inputs)
    weights = record.root / "files" / "out" / "deep" / "weights.bin"
    if damage == "deleted":
        weights.unlink()
    elif damage == "changed":  # same size, other bytes (in place: the earlier run's file changes with it)
        weights.write_bytes(b"\x01\x00" * 1000)
    else:
        shutil.rmtree(record.root)
    second = _run_dir(tmp_path, "second")
    result = reused_or_computed(tmp_path, "stage", inputs, second, _stage(second, calls), [second / "out"])
    assert calls == ["first", "second"] and result[EXECUTION]["reused_from"] is None
    assert (second / "out" / "deep" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert json.loads((record.root / "record.json").read_text())["origin"] == str(second)  # replaced: intact again
    third = _run_dir(tmp_path, "third")
    assert reused_or_computed(tmp_path, "stage", inputs, third, _stage(third, calls),
                              [third / "out"])[EXECUTION]["reused_from"] == str(second)


def test_unknown_content_always_computes_and_records_nothing(tmp_path):
    calls: list[str] = []
    for name in ("first", "second"):
        run_dir = _run_dir(tmp_path, name)
        reused_or_computed(tmp_path, "stage", None, run_dir, _stage(run_dir, calls), [run_dir / "out"])
    assert calls == ["first", "second"] and not (tmp_path / "cache").exists()
    assert content_digest("HuggingFaceH4/no_robots") is None  # a hub dataset name


def test_a_failed_stage_records_nothing(tmp_path):
    run_dir = _run_dir(tmp_path, "first")

    def fails() -> dict:
        raise ValueError("bad rows")

    with pytest.raises(ValueError):
        reused_or_computed(tmp_path, "stage", {"data": "a"}, run_dir, fails, [run_dir])
    assert not list((tmp_path / "cache" / "stages" / "stage").glob("*/record.json"))


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    path = write_tiny_config(root, tiny_model_dir, "reuse-tiny")
    return root, path


def test_stage_keys_follow_content_and_only_the_settings_each_stage_reads(tiny_config, tmp_path):
    root, path = tiny_config
    cfg = load_config(path)
    run_dir = _run_dir(tmp_path, "run")
    keys = {"validate": stage_inputs.validate_inputs(cfg),
            "evaluate": stage_inputs.evaluate_inputs(cfg, run_dir, "base", None)}

    def same(other, *stages_):
        new = {"validate": stage_inputs.validate_inputs(other),
               "evaluate": stage_inputs.evaluate_inputs(other, run_dir, "base", None)}
        return {stage for stage in keys if new[stage] == keys[stage]} == set(stages_)

    assert same(load_config(path, ["train.learning_rate=0.05", "gate.min_task_gain=0.9"]), "validate", "evaluate")
    assert same(load_config(path, ["eval.max_new_tokens=7"]), "validate")
    assert same(load_config(path, ["data.max_length=48"]))  # scoring truncates at data.max_length too
    # The same bytes elsewhere keep every key; one changed row changes the data stage's.
    moved = tmp_path / "moved.jsonl"
    shutil.copy(cfg.data.path, moved)
    assert same(load_config(path, [f"data.path={moved}"]), "validate", "evaluate")
    moved.write_text(moved.read_text().replace("repeat", "say", 1))
    assert same(load_config(path, [f"data.path={moved}"]), "evaluate")
    # The base's other files count (a new chat template in the tokenizer changes every stage that reads it).
    model = tmp_path / "model"
    shutil.copytree(cfg.model.name_or_path, model)
    assert same(load_config(path, [f"model.name_or_path={model}"]), "validate", "evaluate")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 99}))
    assert same(load_config(path, [f"model.name_or_path={model}"]))


def test_the_summary_marks_a_stage_cached_only_when_every_step_was_reused(tmp_path):
    summary = RunSummary(flow_run_id="abc", run_dir=str(tmp_path))
    with summary.stage("train_qlora"):
        summary.note({EXECUTION: execution(0.0, "/runs/earlier")})
    with summary.stage("evaluate"):
        summary.note({EXECUTION: execution(0.0, "/runs/earlier")}, "evaluate-base")
        summary.note({EXECUTION: execution(2.25)}, "evaluate-candidate")
        summary.note(None, "evaluate-champion")  # no champion: not a step
    train, evaluate = summary.stages
    assert train["status"] == "cached" and train["compute_seconds"] == 0.0
    assert evaluate["status"] == "completed" and evaluate["compute_seconds"] == 2.25
    assert set(evaluate["steps"]) == {"evaluate-base", "evaluate-candidate"}
    assert summary.cached_stages() == ["train_qlora"]  # what the run's MLflow tag reused_stages lists


def test_the_device_type_in_every_key_follows_the_gpu_torch_sees(monkeypatch):
    """A CPU-only build is ``cpu`` without importing torch; any other build asks torch (GPU machines)."""
    import torch

    from lora_pipeline.reuse import device_type

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (device_type("2.13.0+cpu"), device_type("2.13.0"), device_type("2.13.0+cu128")) == ("cpu", "cuda", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_type("2.13.0+cu128") == "cpu"


def test_keying_a_stage_on_a_cpu_build_imports_no_torch():
    """What every reused stage pays first: the environment part of its key. On this CPU wheel, no torch import."""
    import subprocess
    import sys
    from importlib.metadata import version

    if not version("torch").endswith("+cpu"):
        pytest.skip("not a CPU-only torch build")
    probe = ("import sys\nfrom lora_pipeline.reuse import environment\n"
             "assert environment()['device'] == 'cpu'\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
