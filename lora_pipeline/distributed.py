"""Multi-process training: ``train.num_processes > 1`` runs :func:`train_qlora` under torchrun.

The calling process (a Prefect task) launches ``torch.distributed.run`` as a subprocess; every rank runs
:func:`worker_main`, accelerate/Trainer wrap the model in DDP (NCCL on GPUs, gloo on CPU), and only
rank 0 writes checkpoints, the adapter, MLflow metrics and the result file the caller reads back. At the
end the ranks compare a checksum of their adapter weights: DDP must leave them identical, and a
mismatch fails the job instead of silently registering one rank's view.

Usage (what :func:`launch_training` runs): ``torchrun --nproc_per_node N -m lora_pipeline.distributed
--config-json C --tokenized T --run-dir R --checkpoint-dir K --result-json OUT [--tracking-uri U --run-id I]``

Several machines (``train.num_machines > 1``): the train stage's machine is machine 0. It launches
``torchrun --nnodes M --rdzv_backend c10d --rdzv_endpoint E --rdzv_id lora-<run key>``, hosting the
rendezvous at ``train.rdzv_endpoint``, and announces the job in ``output_dir/distributed/<endpoint>.json``.
Every other machine runs ``python -m lora_pipeline.distributed join --output-dir O --rdzv-endpoint E``
(machine rank from ``--machine-rank``, ``MACHINE_RANK`` or a Kubernetes Indexed Job's
``JOB_COMPLETION_INDEX``), which waits for that announcement and runs the same command. ``output_dir``
must be shared storage mounted at the same path everywhere: the config, the tokenized data and the
checkpoints are read there, and global rank 0, on whichever machine c10d placed it, writes there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_pipeline.config import PipelineConfig, TrainConfig
from lora_pipeline.processes import run_process_group
from lora_pipeline.redaction import mask_secrets

if TYPE_CHECKING:
    from lora_pipeline.tracking import TrackingRun

logger = logging.getLogger(__name__)


#: How a tracking URI that holds credentials reaches the ranks (environment, not argv: ``ps`` shows argv).
TRACKING_URI_ENV = "LORA_PIPELINE_TRACKING_URI"


class DistributedTrainingError(RuntimeError):
    """The launched training failed, or its ranks disagree; the message says which and where to look."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Subdirectory of ``output_dir`` where machine 0 announces a multi-machine launch to the others.
ANNOUNCE_DIRNAME = "distributed"


def rendezvous_id(run_key: str) -> str:
    """The c10d rendezvous id of one training job: all machines of a run meet under it, two runs never mix."""
    return f"lora-{run_key}"


def announcement_path(output_dir: Path, rdzv_endpoint: str) -> Path:
    """Where machine 0 announces the job hosted at ``rdzv_endpoint`` (one job per endpoint at a time)."""
    return output_dir / ANNOUNCE_DIRNAME / (re.sub(r"[^A-Za-z0-9.-]", "_", rdzv_endpoint) + ".json")


def launcher_command(train: TrainConfig, machine_rank: int = 0, rdzv_id: str = "") -> list[str]:
    """The command that starts this machine's ranks, up to the worker module (its arguments follow).

    One machine: torchrun (or ``accelerate launch``) on a free local port. Several: c10d rendezvous at
    ``train.rdzv_endpoint``; machine 0 hosts its store (``is_host`` set, not left to torch's guess from
    host names and addresses, which on one host matches every machine and relies on a failed bind to sort
    them out). c10d assigns global ranks by sorted host name and pid, not by machine rank, so global rank
    0 may run on any machine (hence shared storage).
    """
    if train.num_machines == 1:
        if train.accelerate_config:
            return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", train.accelerate_config,
                    "--num_processes", str(train.num_processes), "--main_process_port", str(_free_port()),
                    "--module", "lora_pipeline.distributed"]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(train.num_processes),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lora_pipeline.distributed"]
    assert train.rdzv_endpoint is not None  # the config requires it with num_machines > 1
    is_host = f"is_host={str(machine_rank == 0).lower()}"
    if train.accelerate_config:
        # accelerate counts processes over all machines and has no --rdzv_id (torchrun's default "none" is used).
        host, port = train.rdzv_endpoint.rsplit(":", 1)
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", train.accelerate_config,
                "--num_machines", str(train.num_machines), "--machine_rank", str(machine_rank),
                "--num_processes", str(train.num_machines * train.num_processes), "--main_process_ip", host,
                "--main_process_port", port, "--rdzv_backend", "c10d", "--rdzv_conf", is_host,
                "--module", "lora_pipeline.distributed"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(train.num_machines),
            "--nproc_per_node", str(train.num_processes), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", train.rdzv_endpoint, "--rdzv_id", rdzv_id, "--rdzv_conf", is_host,
            "-m", "lora_pipeline.distributed"]


def _run_logged(command: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> int:
    """Run ``command`` with its output streamed to ``log_path``; returns the exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(extra_env or {})}
    with log_path.open("w") as log:
        log.write("launch: " + mask_secrets(" ".join(command)) + "\n")
        log.flush()
        # Streamed to a file, not a pipe: a chatty rank can never block on a full pipe buffer.
        # Its own process group: a stopped stage (timeout, cancellation) takes every rank down with it.
        return run_process_group(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def launch_training(
    cfg: PipelineConfig,
    tokenized_path: Path,
    run_dir: Path,
    checkpoint_dir: Path,
    run: TrackingRun | None = None,
) -> dict[str, Any]:
    """Run training on ``cfg.train.num_processes`` local processes and return rank 0's result.

    With ``train.num_machines > 1`` this machine is machine 0: it also announces the job for the
    machines that :func:`join_training` it, and returns once all of them have finished.

    Returns:
        ``{"adapter_dir": ..., "metrics": {...}}`` as written by rank 0 (metrics include ``world_size``
        and ``rank_checksums_agree``).

    Raises:
        DistributedTrainingError: a rank failed (its output is in ``run_dir/distributed.log``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = run_dir / "train-config.json"
    config_json.write_text(cfg.model_dump_json())
    result_json = run_dir / "train-result.json"
    result_json.unlink(missing_ok=True)
    worker_args = [
        "--config-json", str(config_json), "--tokenized", str(tokenized_path), "--run-dir", str(run_dir),
        "--checkpoint-dir", str(checkpoint_dir), "--result-json", str(result_json),
    ]
    child_env = {}
    if run:
        worker_args += ["--run-id", run.run_id]
        if mask_secrets(run.tracking_uri) == run.tracking_uri:
            worker_args += ["--tracking-uri", run.tracking_uri]
        else:  # credentials in the URI (from MLFLOW_TRACKING_URI): never on a command line, in a log or a file
            child_env[TRACKING_URI_ENV] = run.tracking_uri
    # The checkpoint directory is output_dir/checkpoints/<run key> (stages.train): one rendezvous per run key.
    rdzv_id = rendezvous_id(checkpoint_dir.name)
    command = [*launcher_command(cfg.train, 0, rdzv_id), *worker_args]
    log_path = run_dir / "distributed.log"
    announcement = None
    if cfg.train.num_machines > 1:
        announcement = _announce(cfg, {"config_json": str(config_json), "run_dir": str(run_dir), "rdzv_id": rdzv_id,
                                       "worker_args": worker_args})
        logger.info("launching %d training processes on machine 0 of %d (log: %s); the others join with: python -m "
                    "lora_pipeline.distributed join --output-dir %s --rdzv-endpoint %s", cfg.train.num_processes,
                    cfg.train.num_machines, log_path, cfg.output_dir, cfg.train.rdzv_endpoint)
    else:
        logger.info("launching %d training processes (log: %s)", cfg.train.num_processes, log_path)
    try:
        returncode = _run_logged(command, log_path, child_env)
    finally:
        if announcement is not None:
            announcement.unlink(missing_ok=True)  # a machine started later must not join a finished job
    if returncode != 0 or not result_json.is_file():
        tail = log_path.read_text()[-3000:]
        raise DistributedTrainingError(f"distributed training failed (exit {returncode}); {log_path}:\n{tail}")
    return json.loads(result_json.read_text())


def _announce(cfg: PipelineConfig, spec: dict[str, Any]) -> Path:
    """Publish what the joining machines run (atomically: temp file, then rename); returns its path."""
    assert cfg.train.rdzv_endpoint is not None  # the config requires it with num_machines > 1
    path = announcement_path(cfg.output_dir, cfg.train.rdzv_endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, path)
    return path


def join_training(output_dir: Path, rdzv_endpoint: str, machine_rank: int, wait_seconds: float = 3600.0) -> Path:
    """Run machine ``machine_rank``'s share of the job that machine 0 hosts at ``rdzv_endpoint``.

    Waits for machine 0's announcement under ``output_dir`` (shared storage), then runs the same
    launcher command with this machine's rank. Only global rank 0 writes (adapter, checkpoints, result),
    on whichever machine c10d placed it.

    Returns:
        This machine's log, ``run_dir/distributed-machine<rank>.log``.

    Raises:
        DistributedTrainingError: no announcement within ``wait_seconds``, a bad machine rank, or a
            failed rank (the log's tail is in the message).
    """
    if machine_rank < 1:
        raise DistributedTrainingError(f"machine rank {machine_rank} cannot join: machine 0 runs the train stage")
    path = announcement_path(output_dir, rdzv_endpoint)
    deadline = time.monotonic() + wait_seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DistributedTrainingError(f"no training announced at {path} within {wait_seconds:.0f}s")
        time.sleep(0.5)
    spec = json.loads(path.read_text())
    cfg = PipelineConfig.model_validate(json.loads(Path(spec["config_json"]).read_text()))
    if machine_rank >= cfg.train.num_machines:
        raise DistributedTrainingError(f"machine rank {machine_rank} cannot join a job of train.num_machines="
                                       f"{cfg.train.num_machines} machines (ranks 0..{cfg.train.num_machines - 1})")
    command = [*launcher_command(cfg.train, machine_rank, spec["rdzv_id"]), *spec["worker_args"]]
    log_path = Path(spec["run_dir"]) / f"distributed-machine{machine_rank}.log"
    logger.info("machine %d joins %s (log: %s)", machine_rank, spec["rdzv_id"], log_path)
    returncode = _run_logged(command, log_path)
    if returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise DistributedTrainingError(f"machine {machine_rank} failed (exit {returncode}); {log_path}:\n{tail}")
    return log_path


def join_main(argv: list[str] | None = None) -> int:
    """``python -m lora_pipeline.distributed join``: this machine joins a multi-machine training."""
    parser = argparse.ArgumentParser(
        prog="lora_pipeline.distributed join",
        description="Join the multi-machine training that machine 0 announced under OUTPUT_DIR for RDZV_ENDPOINT.")
    parser.add_argument("--output-dir", type=Path, required=True, help="the pipeline's output_dir (shared storage)")
    parser.add_argument("--rdzv-endpoint", required=True, help="train.rdzv_endpoint (host:port on machine 0)")
    parser.add_argument("--machine-rank", type=int, default=_machine_rank_from_env(),
                        help="default: $MACHINE_RANK, else $JOB_COMPLETION_INDEX (Kubernetes Indexed Job)")
    parser.add_argument("--wait-seconds", type=float, default=3600.0, help="how long to wait for machine 0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.machine_rank is None:
        parser.error("--machine-rank is required (or set MACHINE_RANK / JOB_COMPLETION_INDEX)")
    try:
        join_training(args.output_dir.resolve(), args.rdzv_endpoint, args.machine_rank, args.wait_seconds)
    except DistributedTrainingError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _machine_rank_from_env() -> int | None:
    value = os.environ.get("MACHINE_RANK", os.environ.get("JOB_COMPLETION_INDEX"))
    return int(value) if value not in (None, "") else None


def _gather_checksums(checksum: str) -> list[str]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [checksum]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checksum)
    return [str(item) for item in gathered]


def worker_main(argv: list[str] | None = None) -> int:
    """One rank of a launched training job (see the module docstring for the arguments)."""
    parser = argparse.ArgumentParser(prog="lora_pipeline.distributed")
    for name in ("--config-json", "--tokenized", "--run-dir", "--checkpoint-dir", "--result-json"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")

    from lora_pipeline import tracking
    from lora_pipeline.training import train_qlora

    cfg = PipelineConfig.model_validate(json.loads(args.config_json.read_text()))
    sink = None
    # A URI with credentials comes through the environment (from the launching machine, or this machine's
    # own MLFLOW_TRACKING_URI when it joined), never through the command line.
    tracking_uri = args.tracking_uri or os.environ.get(TRACKING_URI_ENV) or os.environ.get("MLFLOW_TRACKING_URI")
    if rank == 0 and tracking_uri and args.run_id:
        sink = partial(tracking.log_step_metrics, tracking_uri, args.run_id)
    result = train_qlora(cfg, args.tokenized, args.run_dir, metrics_sink=sink, checkpoint_dir=args.checkpoint_dir)
    checksums = _gather_checksums(result.adapter_checksum)
    agree = len(set(checksums)) == 1
    if rank == 0:
        metrics = {**result.metrics, "world_size": float(len(checksums)), "rank_checksums_agree": float(agree)}
        tmp = args.result_json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"adapter_dir": str(result.adapter_dir), "metrics": metrics,
                                   "rank_checksums": checksums}))
        os.replace(tmp, args.result_json)
    _shutdown_process_group()
    if not agree:
        print(f"rank {rank}: adapter weights differ between ranks: {checksums}", file=sys.stderr)
        return 1
    return 0


def _shutdown_process_group() -> None:
    # Without an explicit barrier + destroy, a rank can exit while gloo's background threads still run
    # ("terminate called without an active exception", SIGABRT), failing a job whose work is done.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["join"]:
        sys.exit(join_main(sys.argv[2:]))
    sys.exit(worker_main())
