"""Two-process training on CPU (torchrun, gloo): the multi-GPU code path, tested without a GPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lora_pipeline import stages, tracking
from lora_pipeline.config_files import load_config
from lora_pipeline.formatting import format_dataset
from lora_pipeline.modeling import load_tokenizer


#: The training both the 2-process run here and the 2-machine run (tests/test_multi_node.py) do.
DDP_OVERRIDES = ["train.max_steps=6", "train.warmup_steps=1", "train.save_steps=3", "train.logging_steps=1",
                 "train.per_device_batch_size=4", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"]
_TWO_PROCESS_RUNS: dict[tuple[Path, Path], tuple] = {}


@pytest.fixture(scope="session")
def two_process_run(tiny_model_dir, tiny_rows_path, tmp_path_factory):
    # Imported by tests/test_multi_node.py as well: pytest registers a fixture once per module that holds
    # it, so without the memo the ~40 s run would happen once per module.
    key = (tiny_model_dir, tiny_rows_path)
    if key not in _TWO_PROCESS_RUNS:
        _TWO_PROCESS_RUNS[key] = _train_two_processes(tiny_model_dir, tiny_rows_path, tmp_path_factory.mktemp("ddp"))
    return _TWO_PROCESS_RUNS[key]


def _train_two_processes(tiny_model_dir, tiny_rows_path, root):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={root}",
                             f"data.path={tiny_rows_path}", "train.num_processes=2", *DDP_OVERRIDES])
    run_dir = root / "runs" / "r1"
    tokenized = run_dir / "tokenized.jsonl"
    format_dataset(load_tokenizer(cfg.model), tiny_rows_path, tokenized, cfg.data.max_length)
    uri = tracking.resolve_tracking_uri(cfg.mlflow, cfg.output_dir)
    run_id = tracking.start_pipeline_run(uri, "ddp-test", root / "mlartifacts", run_name="r1", tags={})
    info = tracking.TrackingRun(tracking_uri=uri, run_id=run_id)
    result = stages.train(cfg, tokenized, run_dir, "key1", info)
    return cfg, root, run_dir, result, info


def test_both_ranks_end_with_identical_adapters(two_process_run):
    _, _, run_dir, result, _ = two_process_run
    metrics = result["metrics"]
    assert metrics["world_size"] == 2 and metrics["rank_checksums_agree"] == 1.0
    checksums = json.loads((run_dir / "train-result.json").read_text())["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert metrics["global_step"] == 6
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_one_checkpoint_set_and_one_mlflow_run(two_process_run):
    _, root, _, _, info = two_process_run
    checkpoints = root / "checkpoints" / "key1"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-6"]
    client = MlflowClient(info.tracking_uri)
    experiment = client.get_experiment_by_name("ddp-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [info.run_id]
    losses = client.get_metric_history(info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]  # each step logged once: by rank 0 only


def test_accelerate_config_switches_the_launcher(tiny_model_dir, tmp_path, monkeypatch):
    # `accelerate launch` runs a single process on CPU (its multi-CPU mode needs MPI), so the GPU launch
    # path is checked by its command; the ranks themselves are the same worker as under torchrun.
    from lora_pipeline import distributed

    config_file = Path(__file__).resolve().parents[1] / "infra" / "accelerate" / "multi_gpu_ddp.yaml"
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "data.path=rows.jsonl",
                             "train.num_processes=4", f"train.accelerate_config={config_file}"])
    launched: list[list[str]] = []

    def fake_run(command, **kwargs):
        launched.append(command)
        result_json = Path(command[command.index("--result-json") + 1])
        result_json.write_text(json.dumps({"adapter_dir": "a", "metrics": {"world_size": 4.0}}))
        return 0

    monkeypatch.setattr(distributed, "run_process_group", fake_run)
    result = distributed.launch_training(cfg, tmp_path / "t.jsonl", tmp_path / "run", tmp_path / "ckpt")
    (command,) = launched
    assert command[1:7] == ["-m", "accelerate.commands.launch", "--config_file", str(config_file),
                            "--num_processes", "4"]
    assert command[command.index("--module") + 1] == "lora_pipeline.distributed"
    assert result["metrics"]["world_size"] == 4.0
    assert (tmp_path / "run" / "distributed.log").read_text().startswith("launch: ")


def test_a_tracking_uri_with_credentials_reaches_the_ranks_through_the_environment_only(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """Not on the torchrun command line (``ps`` shows it), not in distributed.log, not in any file of the run."""
    from lora_pipeline import distributed
    from lora_pipeline.tracking import TrackingRun

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "data.path=rows.jsonl",
                             "train.num_processes=2"])
    launched: list[tuple[list[str], dict]] = []

    def fake_run(command, env=None, **kwargs):
        launched.append((command, env))
        result_json = Path(command[command.index("--result-json") + 1])
        result_json.write_text(json.dumps({"adapter_dir": "a", "metrics": {"world_size": 2.0}}))
        return 0

    monkeypatch.setattr(distributed, "run_process_group", fake_run)
    secret_uri = "https://alice:pa55-canary@mlflow.internal"
    distributed.launch_training(cfg, tmp_path / "t.jsonl", tmp_path / "run", tmp_path / "ckpt",
                                TrackingRun(tracking_uri=secret_uri, run_id="r1"))
    (command, env), = launched
    assert "pa55-canary" not in " ".join(command) and "--tracking-uri" not in command
    assert env[distributed.TRACKING_URI_ENV] == secret_uri and command[command.index("--run-id") + 1] == "r1"
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"pa55-canary" not in path.read_bytes(), path
    launched.clear()  # without credentials the URI is an ordinary argument, as before
    distributed.launch_training(cfg, tmp_path / "t.jsonl", tmp_path / "run", tmp_path / "ckpt",
                                TrackingRun(tracking_uri="http://127.0.0.1:5000", run_id="r1"))
    (command, env), = launched
    assert command[command.index("--tracking-uri") + 1] == "http://127.0.0.1:5000"
    assert distributed.TRACKING_URI_ENV not in env


def test_two_processes_killed_mid_training_resume_on_the_next_run_at_its_first_attempt(two_process_run,
                                                                                     tiny_rows_path, tmp_path):
    """SIGKILL to the whole torchrun tree once checkpoint-2 exists (every rank dies at once, like a lost node);
    the next launch resumes from the last intact checkpoint and finishes, its ranks agreeing, although
    save_total_limit (2) rotates the resumed-from checkpoint away on the way (checkpoints every 2 steps)."""
    import os
    import signal
    import threading
    import time

    from lora_pipeline import distributed
    from lora_pipeline.checkpoints import latest_valid_checkpoint

    cfg, _, ddp_run_dir, _, _ = two_process_run
    cfg = cfg.model_copy(update={"output_dir": tmp_path, "train": cfg.train.model_copy(update={"save_steps": 2})})
    checkpoints = tmp_path / "checkpoints" / "key-killed"
    tokenized = ddp_run_dir / "tokenized.jsonl"
    outcome: dict = {}

    def first_attempt():
        try:
            distributed.launch_training(cfg, tokenized, tmp_path / "run1", checkpoints)
        except distributed.DistributedTrainingError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=first_attempt)
    thread.start()
    deadline = time.monotonic() + 300
    while latest_valid_checkpoint(checkpoints, set_aside=False) is None:
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was ever written"
        time.sleep(0.05)
    launcher = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).startswith(
        "torch.distributed.run") and str(checkpoints) in _cmdline(pid, full=True))
    os.killpg(launcher, signal.SIGKILL)  # the launcher's process group: torchrun and both ranks
    thread.join(timeout=120)
    assert "distributed training failed (exit -9)" in outcome["error"]
    resumed = distributed.launch_training(cfg, tokenized, tmp_path / "run2", checkpoints)
    metrics = resumed["metrics"]
    assert metrics["resumed_from_step"] >= 2 and metrics["global_step"] == 6
    assert metrics["world_size"] == 2 and metrics["rank_checksums_agree"] == 1.0
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4", "checkpoint-6"]


def _cmdline(pid: str, full: bool = False) -> str:
    """A process's command line (after the interpreter and its -m, unless ``full``); '' once it is gone."""
    try:
        parts = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return ""
    if full:
        return " ".join(parts)
    return " ".join(parts[2:]) if len(parts) > 2 and parts[1] == "-m" else ""
