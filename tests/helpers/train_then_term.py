"""Run ``train_qlora`` and send this process SIGTERM at the end of step ``TERM_AT`` (like a pod eviction).

Usage: ``python -m tests.helpers.train_then_term CONFIG_JSON TOKENIZED RUN_DIR CHECKPOINT_DIR TERM_AT``.
Training should save a checkpoint and stop with ``TrainingInterrupted`` (exit code 3 here).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from lora_pipeline.checkpoints import TrainingInterrupted
from lora_pipeline.config import PipelineConfig
from lora_pipeline.training import train_qlora


class TermAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # during step TERM_AT + 1
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    config_json, tokenized, run_dir, checkpoint_dir, term_at = sys.argv[1:]
    cfg = PipelineConfig.model_validate(json.loads(Path(config_json).read_text()))
    try:
        train_qlora(cfg, Path(tokenized), Path(run_dir), checkpoint_dir=Path(checkpoint_dir),
                    callbacks=[TermAtStep(int(term_at))])
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
    sys.exit("training finished although it was sent SIGTERM")
