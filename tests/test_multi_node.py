"""Training across machines: c10d rendezvous commands, and two loopback "machines" that train what one does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from lora_pipeline import distributed, tracking
from lora_pipeline.config import ConfigError
from lora_pipeline.config_files import load_config
# The memo of the one 2-process run per session lives in tests/helpers/two_processes.py.
from tests.helpers.two_processes import DDP_OVERRIDES, two_process_run  # noqa: F401

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", "data.path=rows.jsonl", *overrides])


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_machines_need_a_rendezvous_endpoint(tmp_path):
    with pytest.raises(ConfigError, match="train.rdzv_endpoint"):
        _config(tmp_path, "train.num_machines=2")
    for bad in ("trainer-0", ":29400", "trainer-0:http", "trainer-0:70000"):
        with pytest.raises(ConfigError, match="host:port"):
            _config(tmp_path, "train.num_machines=2", f"train.rdzv_endpoint={bad}")
    with pytest.raises(ConfigError, match="num_machines"):
        _config(tmp_path, "train.num_machines=0")
    assert _config(tmp_path, "train.num_machines=2", "train.rdzv_endpoint='[::1]:29400'").train.distributed


def test_run_key_ignores_the_endpoint_but_not_the_training(tmp_path):
    def key(*overrides: str) -> str:
        return _config(tmp_path, "train.num_machines=2", *overrides).run_key("data", "base")

    here, there = key("train.rdzv_endpoint=a:1"), key("train.rdzv_endpoint=b.cluster:29400")
    assert here == there  # the same training on another cluster address: same checkpoints, same rendezvous
    assert distributed.rendezvous_id(here) == distributed.rendezvous_id(there) == f"lora-{here}"
    other = key("train.rdzv_endpoint=a:1", "train.seed=1")
    assert other != here and distributed.rendezvous_id(other) != distributed.rendezvous_id(here)


def test_multi_machine_command_uses_c10d_rendezvous(tmp_path):
    train = _config(tmp_path, "train.num_machines=3", "train.num_processes=4",
                    "train.rdzv_endpoint=trainer-0.trainer:29400").train
    host_command = distributed.launcher_command(train, 0, "lora-abc")
    assert host_command[1:3] == ["-m", "torch.distributed.run"]
    assert _flag(host_command, "--nnodes") == "3" and _flag(host_command, "--nproc_per_node") == "4"
    assert _flag(host_command, "--rdzv_backend") == "c10d"
    assert _flag(host_command, "--rdzv_endpoint") == "trainer-0.trainer:29400"
    assert _flag(host_command, "--rdzv_id") == "lora-abc"
    assert _flag(host_command, "--rdzv_conf") == "is_host=true"
    assert "--master_addr" not in host_command and "--master_port" not in host_command
    joiner = distributed.launcher_command(train, 2, "lora-abc")
    assert _flag(joiner, "--rdzv_conf") == "is_host=false"
    assert [a for a in joiner if "is_host" not in a] == [a for a in host_command if "is_host" not in a]


def test_one_machine_command_is_unchanged(tmp_path):
    command = distributed.launcher_command(_config(tmp_path, "train.num_processes=2").train, 0, "lora-abc")
    assert command[:8] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port"]
    assert int(command[8]) > 0 and command[9:] == ["-m", "lora_pipeline.distributed"]
    assert not any(arg.startswith("--rdzv") or arg == "--nnodes" for arg in command)


def test_accelerate_multi_node_command(tmp_path):
    config_file = INFRA / "accelerate" / "multi_node.yaml"
    settings = yaml.safe_load(config_file.read_text())
    # with same_network: true accelerate would pass the address as --master_addr, which c10d ignores
    assert settings["rdzv_backend"] == "c10d" and settings["same_network"] is False
    train = _config(tmp_path, "train.num_machines=2", "train.num_processes=4", "train.rdzv_endpoint=h0:29400",
                    f"train.accelerate_config={config_file}").train
    command = distributed.launcher_command(train, 1, "lora-abc")
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    assert _flag(command, "--num_machines") == "2" and _flag(command, "--machine_rank") == "1"
    assert _flag(command, "--num_processes") == "8"  # accelerate counts all machines' processes
    assert (_flag(command, "--main_process_ip"), _flag(command, "--main_process_port")) == ("h0", "29400")
    assert _flag(command, "--rdzv_backend") == "c10d" and _flag(command, "--rdzv_conf") == "is_host=false"


def test_kubernetes_job_gives_each_pod_a_machine_rank_and_pod_0_the_endpoint():
    service, job = yaml.safe_load_all((INFRA / "k8s" / "multi-node-training-job.yaml").read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["RDZV_ENDPOINT"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29400"
    assert env["NUM_MACHINES"] == str(spec["completions"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_MACHINE"])
    assert "lora_pipeline.distributed join" in container["args"][0]
    assert '--machine-rank "$JOB_COMPLETION_INDEX"' in container["args"][0]


def test_join_waits_for_machine_0_and_runs_its_command(tmp_path, monkeypatch):
    cfg = _config(tmp_path, "train.num_machines=2", "train.rdzv_endpoint=127.0.0.1:29400")
    announcement = distributed.announcement_path(cfg.output_dir, "127.0.0.1:29400")
    launched: dict[str, list[str]] = {}

    def fake_run(command, **kwargs):
        if _flag(command, "--rdzv_conf") == "is_host=true":  # machine 0; machine 1 joins meanwhile
            launched["machine0"] = command
            assert announcement.is_file()
            distributed.join_training(cfg.output_dir, "127.0.0.1:29400", 1, wait_seconds=1)
            Path(_flag(command, "--result-json")).write_text(json.dumps({"adapter_dir": "a", "metrics": {}}))
        else:
            launched["machine1"] = command
        return 0

    monkeypatch.setattr(distributed, "run_process_group", fake_run)
    distributed.launch_training(cfg, tmp_path / "t.jsonl", tmp_path / "run", tmp_path / "checkpoints" / "key7")
    machine0, machine1 = launched["machine0"], launched["machine1"]
    assert _flag(machine0, "--rdzv_id") == _flag(machine1, "--rdzv_id") == "lora-key7"
    assert [a for a in machine1 if "is_host" not in a] == [a for a in machine0 if "is_host" not in a]
    assert (tmp_path / "run" / "distributed-machine1.log").read_text().startswith("launch: ")
    assert not announcement.exists()  # a machine started after the job must not join it


def test_join_without_a_launch_gives_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    args = ["--output-dir", str(tmp_path), "--rdzv-endpoint", "h0:29400", "--wait-seconds", "0.2"]
    assert distributed.join_main(args) == 1
    assert "no training announced" in capsys.readouterr().err
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(SystemExit):
        distributed.join_main(args)  # no machine rank anywhere
    with pytest.raises(distributed.DistributedTrainingError, match="machine 0 runs the train stage"):
        distributed.join_training(tmp_path, "h0:29400", 0, wait_seconds=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_machines_train_what_two_processes_train(two_process_run, tiny_model_dir, tiny_rows_path,  # noqa: F811
                                                     tmp_path):
    _, _, ddp_run_dir, _, _ = two_process_run
    endpoint = f"127.0.0.1:{_free_port()}"
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
                             f"data.path={tiny_rows_path}", "train.num_machines=2", "train.num_processes=1",
                             f"train.rdzv_endpoint={endpoint}", *DDP_OVERRIDES])
    uri = tracking.resolve_tracking_uri(cfg.mlflow, cfg.output_dir)
    run_id = tracking.start_pipeline_run(uri, "multi-node-test", tmp_path / "mlartifacts", run_name="m", tags={})
    # Machine 1 starts first and waits for machine 0's announcement, as a pod started early would.
    joiner = subprocess.Popen([sys.executable, "-m", "lora_pipeline.distributed", "join", "--output-dir",
                               str(tmp_path), "--rdzv-endpoint", endpoint, "--machine-rank", "1",
                               "--wait-seconds", "300"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = tmp_path / "runs" / "m"
        result = distributed.launch_training(cfg, ddp_run_dir / "tokenized.jsonl", run_dir,
                                             tmp_path / "checkpoints" / "key-mn",
                                             tracking.TrackingRun(tracking_uri=uri, run_id=run_id))
        joiner_output, _ = joiner.communicate(timeout=120)
    finally:
        joiner.kill()
    assert joiner.returncode == 0, joiner_output
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["rank_checksums_agree"] == 1.0
    checksums = json.loads((run_dir / "train-result.json").read_text())["rank_checksums"]
    ddp_checksums = json.loads((ddp_run_dir / "train-result.json").read_text())["rank_checksums"]
    assert checksums == ddp_checksums  # same data, seed and world size: bit-identical adapters
    for log in ("distributed.log", "distributed-machine1.log"):
        launch = (run_dir / log).read_text().splitlines()[0]
        assert "--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in launch and "--rdzv_id lora-key-mn" in launch
    checkpoints = tmp_path / "checkpoints" / "key-mn"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-6"]
    losses = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]  # logged once per step: by global rank 0 only
