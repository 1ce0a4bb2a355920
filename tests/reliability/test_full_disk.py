"""A full disk (ENOSPC) while saving a checkpoint or the merged model: a clear error, earlier work intact.

A checkpoint cut short by the full disk is set aside and the earlier ones stay; a merged model cut short leaves
no directory behind, so nothing can be registered from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_pipeline.checkpoints import latest_valid_checkpoint
from lora_pipeline.formatting import encode_generation_prompt, prompt_turns
from lora_pipeline.merge import MergeError, merge_adapter
from lora_pipeline.modeling import load_tokenizer
from lora_pipeline.training import train_qlora
from tests.conftest import chat_rows
from tests.helpers.trainings import setup, trained  # noqa: F401  (fixtures)


def _prompts(cfg, adapter_dir, count):
    tokenizer = load_tokenizer(cfg.model, adapter_dir)
    return [encode_generation_prompt(tokenizer, prompt_turns(row["messages"])) for row in chat_rows()[:count]]


def test_a_full_disk_while_saving_a_checkpoint_is_a_clear_error_and_earlier_checkpoints_stay_intact(
        setup, tmp_path, monkeypatch):
    import errno

    from lora_pipeline.checkpoints import DiskFullError

    cfg, tokenized, _ = setup
    checkpoints = tmp_path / "ckpt"
    real_save = torch.save

    def fills_up_at_checkpoint_8(obj, f, *args, **kwargs):
        if "checkpoint-8" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up_at_checkpoint_8)
    with pytest.raises(DiskFullError, match="disk full while saving a checkpoint under .*earlier checkpoints are "
                                            "intact"):
        train_qlora(cfg, tokenized, tmp_path / "run", checkpoint_dir=checkpoints)
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_valid_checkpoint(checkpoints) == checkpoints / "checkpoint-4"  # checkpoint-8 set aside
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_full_disk_while_saving_the_merged_model_writes_nothing(trained, tmp_path, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    cfg, _, result, _ = trained

    def fills_up(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 100)  # a truncated weights file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_up)
    with pytest.raises(MergeError, match="disk full while writing the merged model"):
        merge_adapter(cfg, result.adapter_dir, tmp_path / "merged", _prompts(cfg, result.adapter_dir, 2), [2])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no merged dir, no partial one: nothing to register
