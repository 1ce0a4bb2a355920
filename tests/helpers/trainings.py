"""Small trainings on the tiny model that several test modules read, resume, corrupt or merge.

Module-scoped fixtures: a module imports the ones it uses (``from tests.helpers.trainings import setup``) and
pytest builds each once per importing module (each costs a few seconds at most).
"""

from __future__ import annotations

import pytest

from lora_pipeline.config_files import load_config
from lora_pipeline.formatting import format_dataset
from lora_pipeline.modeling import load_tokenizer
from lora_pipeline.training import train_qlora


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_rows_path, tmp_path_factory):
    """The checkpoint tests' training (8 steps, a checkpoint every 4): (config, tokenized rows, root)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"output_dir={root}", f"data.path={tiny_rows_path}",
        "train.max_steps=8", "train.warmup_steps=1", "train.save_steps=4", "train.logging_steps=1",
        "train.per_device_batch_size=4", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1",
        "train.learning_rate=5e-3",
    ])
    tokenized = root / "tokenized.jsonl"
    format_dataset(load_tokenizer(cfg.model), tiny_rows_path, tokenized, cfg.data.max_length)
    return cfg, tokenized, root


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """``setup``'s training run straight through: (its result, its checkpoint directory)."""
    cfg, tokenized, root = setup
    result = train_qlora(cfg, tokenized, root / "straight", checkpoint_dir=root / "straight-ckpt")
    return result, root / "straight-ckpt"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_rows_path, tmp_path_factory):
    """The merge tests' training (12 steps, no dropout): (config, run dir, result, the metrics it streamed)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"output_dir={run_dir}", f"data.path={tiny_rows_path}",
        "train.max_steps=12", "train.warmup_steps=1", "train.save_steps=6", "train.logging_steps=4",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.learning_rate=5e-3",
    ])
    tokenizer = load_tokenizer(cfg.model)
    format_dataset(tokenizer, tiny_rows_path, run_dir / "tokenized.jsonl", cfg.data.max_length)
    logged: list[tuple[int, dict]] = []
    result = train_qlora(cfg, run_dir / "tokenized.jsonl", run_dir, metrics_sink=lambda m, s: logged.append((s, dict(m))))
    return cfg, run_dir, result, logged
