"""The run summary records each stage's status and time, also when a stage fails."""

import json

import pytest

from lora_pipeline.summary import RunSummary, new_run_dir


def test_stages_are_timed_and_failures_recorded(tmp_path):
    summary = RunSummary(flow_run_id="abc", run_dir=str(tmp_path))
    with summary.stage("first"):
        pass
    with pytest.raises(ValueError), summary.stage("second"):
        raise ValueError("bad rows")
    summary.write(tmp_path / "summary.json", None)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in saved["stages"]] == [("first", "completed"), ("second", "failed")]
    assert all(isinstance(s["seconds"], float) for s in saved["stages"])
    assert saved["status"] == "failed"
    assert "bad rows" in saved["error"]


def test_run_dirs_are_unique_and_under_output_dir(tmp_path):
    first = new_run_dir(tmp_path, "0123456789abcdef")
    assert first.parent == tmp_path / "runs" and first.is_dir()
    with pytest.raises(FileExistsError):
        new_run_dir(tmp_path, "0123456789abcdef")  # same second, same id: never reuse a run dir
