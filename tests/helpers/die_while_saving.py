"""Run ``train_qlora`` and SIGKILL this process half way through writing the adapter of checkpoint ``KILL_AT``.

Usage: ``python -m tests.helpers.die_while_saving CONFIG_JSON TOKENIZED RUN_DIR CHECKPOINT_DIR KILL_AT``.
PEFT writes a checkpoint's adapter with ``safetensors``; here that write stops after half of the file's bytes
reached the disk, and the process dies on the spot (no Python cleanup, no manifest): a node lost mid-save.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import peft.peft_model
from safetensors.torch import save

from lora_pipeline.config import PipelineConfig
from lora_pipeline.training import train_qlora


def _dying_save_file(kill_at: int, real_save_file):
    def save_file(tensors, filename, metadata=None):
        if Path(filename).parent.name != f"checkpoint-{kill_at}":
            return real_save_file(tensors, filename, metadata=metadata)
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    return save_file


if __name__ == "__main__":
    config_json, tokenized, run_dir, checkpoint_dir, kill_at = sys.argv[1:]
    peft.peft_model.safe_save_file = _dying_save_file(int(kill_at), peft.peft_model.safe_save_file)
    cfg = PipelineConfig.model_validate(json.loads(Path(config_json).read_text()))
    train_qlora(cfg, Path(tokenized), Path(run_dir), checkpoint_dir=Path(checkpoint_dir))
    sys.exit("training finished without being killed")
