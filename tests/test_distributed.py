"""Two-process training on CPU (torchrun, gloo): the multi-GPU code path, tested without a GPU.

The faults (the whole torchrun tree killed; credentials kept off the command line):
tests/reliability/test_killed_training.py, tests/reliability/test_secrets.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from lora_pipeline.config_files import load_config
from tests.helpers.two_processes import DDP_OVERRIDES, two_process_run  # noqa: F401  (one 2-process run per session)


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
