"""Checkpoints: every saved one has a manifest, and finished training is reused rather than repeated.

The faults (killed, terminated, corrupt, incomplete, planted pickles, two runs of one key):
tests/reliability/test_killed_training.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_pipeline.checkpoints import MANIFEST_NAME, checkpoint_problem
from lora_pipeline.training import train_qlora
from tests.helpers.trainings import setup, uninterrupted  # noqa: F401  (fixtures)

ADAPTER_FILE = "adapter_model.safetensors"


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / ADAPTER_FILE))


def test_every_saved_checkpoint_has_a_manifest(uninterrupted):
    result, checkpoints = uninterrupted
    assert result.metrics["global_step"] == 8 and result.metrics["resumed_from_step"] == 0
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-8"]
    for checkpoint in (checkpoints / "checkpoint-4", checkpoints / "checkpoint-8"):
        manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())["files"]
        assert {ADAPTER_FILE, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(manifest)
        assert checkpoint_problem(checkpoint) is None


def test_rerunning_finished_training_reuses_it(setup, uninterrupted, tmp_path):
    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", str(uninterrupted[1]), str(checkpoints)], check=True)
    again = train_qlora(cfg, tokenized, tmp_path / "run", checkpoint_dir=checkpoints)
    assert again.metrics["resumed_from_step"] == 8 and again.metrics["global_step"] == 8
    for name, tensor in _adapter(uninterrupted[0].adapter_dir).items():
        assert torch.equal(_adapter(again.adapter_dir)[name], tensor), name
