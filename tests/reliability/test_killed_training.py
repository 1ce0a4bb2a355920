"""Killed, terminated and tampered-with training: it resumes from the last intact checkpoint, never a broken one.

SIGKILL (one process, or the whole 2-process torchrun tree) and SIGTERM mid-training; the resumed-from checkpoint
rotated away; corrupt and incomplete checkpoints set aside by rank 0 only; pickles planted in a checkpoint; two runs
of one run key taking turns.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_pipeline.checkpoints import SET_ASIDE_DIRNAME, checkpoint_problem, latest_valid_checkpoint
from lora_pipeline.training import train_qlora
from tests.helpers.trainings import setup, uninterrupted  # noqa: F401  (fixtures)
from tests.helpers.two_processes import two_process_run  # noqa: F401  (one 2-process run per session)

REPO_ROOT = Path(__file__).resolve().parents[2]
ADAPTER_FILE = "adapter_model.safetensors"


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / ADAPTER_FILE))


def _train_in_a_process(helper: str, cfg, tokenized: Path, root: Path, checkpoints: Path, step: int):
    """``python -m tests.helpers.<helper>``: train in a child process that is stopped at ``step`` (SIGKILL
    after that checkpoint, or SIGTERM during the next step); returns the finished process."""
    config_json = root / "config.json"
    config_json.write_text(cfg.model_dump_json())
    return subprocess.run(
        [sys.executable, "-m", f"tests.helpers.{helper}", str(config_json), str(tokenized), str(root / "run1"),
         str(checkpoints), str(step)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


def _with_save_steps(cfg, save_steps: int):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"save_steps": save_steps})})


def test_killed_training_resumes_from_its_last_checkpoint(setup, uninterrupted, tmp_path):
    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "ckpt"
    killed = _train_in_a_process("train_then_die", cfg, tokenized, tmp_path, checkpoints, 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in checkpoints.iterdir() if p.is_dir()] == ["checkpoint-4"]

    logged: list[int] = []

    def flaky_tracking_server(metrics, step):
        if "loss" in metrics:
            logged.append(step)
        if step == 6:
            raise ConnectionError("tracking server 503")  # a metrics sink that fails never stops training

    resumed = train_qlora(cfg, tokenized, tmp_path / "run2", checkpoint_dir=checkpoints,
                          metrics_sink=flaky_tracking_server)
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["global_step"] == 8
    assert logged == [5, 6, 7, 8]  # per-step losses: the global step continues, it does not restart
    # Same final adapter as a run that was never interrupted: the optimizer moments, scheduler, RNG
    # (LoRA dropout is on) and data position were all restored. A fresh Adam would differ by far more.
    straight = _adapter(uninterrupted[0].adapter_dir)
    after_resume = _adapter(resumed.adapter_dir)
    assert straight.keys() == after_resume.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(after_resume[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_process_killed_while_writing_a_checkpoint_resumes_from_the_one_before(setup, tmp_path):
    """SIGKILL half way through the adapter file of checkpoint 8: a truncated safetensors file and no manifest.
    The next run sets that checkpoint aside (incomplete), resumes from checkpoint 4 and finishes."""
    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "ckpt"
    killed = _train_in_a_process("die_while_saving", cfg, tokenized, tmp_path, checkpoints, 8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    half_written = checkpoints / "checkpoint-8" / ADAPTER_FILE
    assert 0 < half_written.stat().st_size and checkpoint_problem(half_written.parent) == "incomplete"

    resumed = train_qlora(cfg, tokenized, tmp_path / "run2", checkpoint_dir=checkpoints)
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["global_step"] == 8
    (aside,) = (checkpoints / SET_ASIDE_DIRNAME).iterdir()
    assert aside.name.startswith("checkpoint-8-incomplete-")
    assert _adapter(resumed.adapter_dir)  # a readable adapter, not the half-written one


def test_changed_data_or_config_after_a_crash_start_afresh_never_a_mixed_resume(setup, tmp_path):
    """Checkpoints live under the run key (data hash, base, training config): a retry after a crash with other
    data or another learning rate trains from step 0 in a directory of its own; only the same training resumes."""
    import hashlib

    from lora_pipeline import stages

    cfg, tokenized, _ = setup
    cfg = cfg.model_copy(update={"output_dir": tmp_path / "out"})
    data_hash = hashlib.sha256(tokenized.read_bytes()).hexdigest()
    crashed_key = cfg.run_key(data_hash, "sha256:tiny")
    checkpoints = cfg.output_dir / "checkpoints"
    killed = _train_in_a_process("train_then_die", cfg, tokenized, tmp_path, checkpoints / crashed_key, 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    changed_data = tmp_path / "changed.jsonl"
    rows = tokenized.read_bytes().splitlines(keepends=True)
    changed_data.write_bytes(b"".join(rows[1:] * 2))  # one row gone, the rest twice
    other_lr = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-3})})
    for run_cfg, data, label in ((cfg, changed_data, "changed data"), (other_lr, tokenized, "changed config")):
        key = run_cfg.run_key(hashlib.sha256(data.read_bytes()).hexdigest(), "sha256:tiny")
        assert key != crashed_key, label
        trained = stages.train(run_cfg, data, tmp_path / label, key, None)
        assert trained["metrics"]["resumed_from_step"] == 0, label  # afresh ...
        assert sorted(p.name for p in (checkpoints / key).iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-8"]
    # ... and the crashed training's checkpoint is untouched, for the retry of that same training to resume.
    assert [p.name for p in (checkpoints / crashed_key).iterdir() if p.is_dir()] == ["checkpoint-4"]
    resumed = stages.train(cfg, tokenized, tmp_path / "same", crashed_key, None)
    assert resumed["metrics"]["resumed_from_step"] == 4 and resumed["metrics"]["global_step"] == 8


def test_a_resumed_run_outlives_the_rotation_of_the_checkpoint_it_resumed_from(setup, tmp_path):
    """Killed after checkpoint-2, resumed: checkpoints 4, 6 and 8 follow and save_total_limit (2) rotates
    checkpoint-2 away mid-run. The end of the run once read that checkpoint again (FileNotFoundError, hidden
    by a task retry); it must succeed on its first attempt."""
    cfg, tokenized, _ = setup
    cfg = _with_save_steps(cfg, 2)
    checkpoints = tmp_path / "ckpt"
    killed = _train_in_a_process("train_then_die", cfg, tokenized, tmp_path, checkpoints, 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train_qlora(cfg, tokenized, tmp_path / "run2", checkpoint_dir=checkpoints)
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["global_step"] == 8
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-6", "checkpoint-8"]
    assert resumed.metrics["tokens_per_second"] > 0  # this session's tokens, counted from checkpoint-2


def test_sigterm_saves_a_checkpoint_before_training_stops_and_the_next_run_resumes_there(setup, uninterrupted,
                                                                                      tmp_path):
    """No periodic checkpoint would come before step 8 (save_steps 100): SIGTERM during step 3 still leaves an
    intact checkpoint-3, training stops with a clear error (no adapter of a cut-short run), and the next run
    resumes from step 3 to the same adapter as an uninterrupted run."""
    cfg, tokenized, _ = setup
    cfg = _with_save_steps(cfg, 100)
    checkpoints = tmp_path / "ckpt"
    termed = _train_in_a_process("train_then_term", cfg, tokenized, tmp_path, checkpoints, 2)
    assert termed.returncode == 3, termed.stderr[-3000:]
    assert "training stopped by SIGTERM at step 3 of 8" in termed.stderr
    assert latest_valid_checkpoint(checkpoints) == checkpoints / "checkpoint-3"
    assert not (tmp_path / "run1" / "adapter").exists()
    resumed = train_qlora(cfg, tokenized, tmp_path / "run2", checkpoint_dir=checkpoints)
    assert resumed.metrics["resumed_from_step"] == 3 and resumed.metrics["global_step"] == 8
    straight = _adapter(uninterrupted[0].adapter_dir)
    for name, tensor in _adapter(resumed.adapter_dir).items():
        torch.testing.assert_close(tensor, straight[name], rtol=1e-4, atol=1e-5, msg=name)


def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_used(setup, uninterrupted, tmp_path):
    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", str(uninterrupted[1]), str(checkpoints)], check=True)
    adapter = checkpoints / "checkpoint-8" / ADAPTER_FILE
    data = bytearray(adapter.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: same size, different content
    adapter.write_bytes(bytes(data))
    assert checkpoint_problem(checkpoints / "checkpoint-8") == "corrupt-file"

    assert latest_valid_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    (aside,) = (checkpoints / SET_ASIDE_DIRNAME).iterdir()
    assert aside.name.startswith("checkpoint-8-corrupt-file-") and (aside / ADAPTER_FILE).is_file()

    resumed = train_qlora(cfg, tokenized, tmp_path / "run", checkpoint_dir=checkpoints)
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["global_step"] == 8


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    complete, partial = tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"
    for directory in (complete, partial):
        directory.mkdir()
        (directory / ADAPTER_FILE).write_bytes(b"weights")
    from lora_pipeline.checkpoints import write_manifest

    write_manifest(complete)  # checkpoint-3 crashed before its manifest
    assert latest_valid_checkpoint(tmp_path) == complete
    assert [p.name.split("-")[2] for p in (tmp_path / SET_ASIDE_DIRNAME).iterdir()] == ["incomplete"]
    assert latest_valid_checkpoint(tmp_path / "missing") is None


def test_only_rank_zero_sets_a_broken_checkpoint_aside(uninterrupted, tmp_path):
    checkpoints = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", str(uninterrupted[1]), str(checkpoints)], check=True)
    (checkpoints / "checkpoint-8" / ADAPTER_FILE).write_bytes(b"truncated")
    # Another rank chooses the same checkpoint and leaves the broken one where it is ...
    assert latest_valid_checkpoint(checkpoints, set_aside=False) == checkpoints / "checkpoint-4"
    assert (checkpoints / "checkpoint-8").is_dir() and not (checkpoints / SET_ASIDE_DIRNAME).exists()
    # ... rank 0 moves it aside.
    assert latest_valid_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    assert not (checkpoints / "checkpoint-8").exists()


def test_two_runs_of_one_run_key_take_turns_and_never_interleave_checkpoints(setup, uninterrupted, tmp_path):
    """While one run holds the run key (the test holds its lock), a second run of the same training waits;
    once it is released it resumes from the first run's checkpoints instead of writing beside them."""
    import threading

    from lora_pipeline.checkpoints import exclusive_run_key

    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "checkpoints" / "same-key"
    outcome: dict = {}

    def second_run():
        with exclusive_run_key(checkpoints):
            outcome["result"] = train_qlora(cfg, tokenized, tmp_path / "second", checkpoint_dir=checkpoints)

    with exclusive_run_key(checkpoints):  # the first run: it "trains" by copying a finished training in
        waiter = threading.Thread(target=second_run)
        waiter.start()
        waiter.join(timeout=3)
        assert waiter.is_alive() and not checkpoints.exists()  # waiting, nothing written
        subprocess.run(["cp", "-r", str(uninterrupted[1]), str(checkpoints)], check=True)
    waiter.join(timeout=600)
    assert outcome["result"].metrics["resumed_from_step"] == 8  # it found the first run's work finished
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-8"]


class _WritesAMarker:
    """Unpickling this calls open(marker, "w"): what a hostile checkpoint file would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin",
                                  "adapter_model.bin"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(setup, uninterrupted, tmp_path, name):
    """An attacker who can write the checkpoint directory (and so its manifest too) plants a pickle whose
    unpickling would write a marker file: resuming refuses it or ignores it, and the marker never appears."""
    import pickle

    from lora_pipeline.checkpoints import write_manifest

    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    subprocess.run(["cp", "-r", str(uninterrupted[1] / "checkpoint-4"), str(checkpoints)], check=True)
    marker = tmp_path / "pwned"
    (checkpoints / "checkpoint-4" / name).write_bytes(pickle.dumps(_WritesAMarker(marker)))
    write_manifest(checkpoints / "checkpoint-4")  # the manifest matches: only unpickling could stop it
    try:
        result = train_qlora(cfg, tokenized, tmp_path / "run", checkpoint_dir=checkpoints)
    except Exception as exc:  # refused: torch.load(weights_only=True) rejects the pickle's globals
        assert "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ + str(exc), exc
    else:  # ignored: the file is never unpickled (training_args.bin; adapter weights load from safetensors)
        assert result.metrics["global_step"] == 8
    assert not marker.exists()


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
