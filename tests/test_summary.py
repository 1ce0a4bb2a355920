"""The run summary records each stage's status and time, also when a stage fails."""

import json

import pytest

from lora_pipeline.summary import RunSummary, run_dir_for


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
    assert summary.failed_stage == "second"  # what a failure notice names


def test_run_dirs_are_per_flow_run_and_under_output_dir(tmp_path):
    from datetime import datetime, timezone

    started = datetime(2026, 11, 30, 6, 0, 1, tzinfo=timezone.utc)
    first = run_dir_for(tmp_path, "0123456789abcdef", started)
    assert first == tmp_path / "runs" / "20261130T060001Z-01234567" and first.is_dir()
    assert run_dir_for(tmp_path, "0123456789abcdef", started) == first  # a retry of the same flow run
    assert run_dir_for(tmp_path, "fedcba9876543210", started) != first  # another flow run, same second
