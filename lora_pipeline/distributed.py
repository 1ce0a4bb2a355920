"""Multi-process training: ``train.num_processes > 1`` runs :func:`train_qlora` under torchrun.

The calling process (a Prefect task) launches ``torch.distributed.run`` as a subprocess; every rank runs
:func:`worker_main`, accelerate/Trainer wrap the model in DDP (NCCL on GPUs, gloo on CPU), and only
rank 0 writes checkpoints, the adapter, MLflow metrics and the result file the caller reads back. At the
end the ranks compare a checksum of their adapter weights: DDP must leave them identical, and a
mismatch fails the job instead of silently registering one rank's view.

Usage (what :func:`launch_training` runs): ``torchrun --nproc_per_node N -m lora_pipeline.distributed
--config-json C --tokenized T --run-dir R --checkpoint-dir K --result-json OUT [--tracking-uri U --run-id I]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from lora_pipeline.tracking import TrackingRun

logger = logging.getLogger(__name__)


class DistributedTrainingError(RuntimeError):
    """The launched training failed, or its ranks disagree; the message says which and where to look."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_training(
    cfg: PipelineConfig,
    tokenized_path: Path,
    run_dir: Path,
    checkpoint_dir: Path,
    run: TrackingRun | None = None,
) -> dict[str, Any]:
    """Run training on ``cfg.train.num_processes`` local processes and return rank 0's result.

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
    if cfg.train.accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.train.accelerate_config,
                    "--num_processes", str(cfg.train.num_processes), "--main_process_port", str(_free_port()),
                    "--module", "lora_pipeline.distributed"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.train.num_processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lora_pipeline.distributed"]
    command = [
        *launcher,
        "--config-json", str(config_json), "--tokenized", str(tokenized_path), "--run-dir", str(run_dir),
        "--checkpoint-dir", str(checkpoint_dir), "--result-json", str(result_json),
    ]
    if run:
        command += ["--tracking-uri", run.tracking_uri, "--run-id", run.run_id]
    log_path = run_dir / "distributed.log"
    logger.info("launching %d training processes (log: %s)", cfg.train.num_processes, log_path)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log_path.open("w") as log:
        log.write("launch: " + " ".join(command) + "\n")
        log.flush()
        # Streamed to a file, not a pipe: a chatty rank can never block on a full pipe buffer.
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0 or not result_json.is_file():
        tail = log_path.read_text()[-3000:]
        raise DistributedTrainingError(f"distributed training failed (exit {done.returncode}); {log_path}:\n{tail}")
    return json.loads(result_json.read_text())


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
    if rank == 0 and args.tracking_uri and args.run_id:
        sink = partial(tracking.log_step_metrics, args.tracking_uri, args.run_id)
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
    sys.exit(worker_main())
