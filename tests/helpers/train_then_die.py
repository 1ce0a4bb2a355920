"""Run ``train_qlora`` and SIGKILL this process right after the checkpoint of step ``KILL_AT`` is saved.

Usage: ``python -m tests.helpers.train_then_die CONFIG_JSON TOKENIZED RUN_DIR CHECKPOINT_DIR KILL_AT``.
The kill happens after the manifest callback (callbacks run in order), i.e. like a node lost between
two checkpoints; the test then proves the next attempt resumes from that step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from lora_pipeline.config import PipelineConfig
from lora_pipeline.training import train_qlora


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    config_json, tokenized, run_dir, checkpoint_dir, kill_at = sys.argv[1:]
    cfg = PipelineConfig.model_validate(json.loads(Path(config_json).read_text()))
    train_qlora(cfg, Path(tokenized), Path(run_dir), checkpoint_dir=Path(checkpoint_dir),
                callbacks=[KillAfterSave(int(kill_at))])
    sys.exit("training finished without being killed")
