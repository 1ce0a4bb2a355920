"""A small pipeline config on the tiny test model (shared by the flow and operations tests)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import chat_rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_tiny_config(root: Path, model_dir: Path, model_name: str, system_metrics_interval: float = 0.0) -> Path:
    """``root/config.yaml``: the tiny model, its copy-task rows (8 held out), a few steps, an open gate."""
    rows = chat_rows()
    train, held_out = rows[8:], rows[:8]
    config = {
        "output_dir": str(root / "outputs"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": write_jsonl(root / "train.jsonl", train), "format": "messages",
                 "eval_path": write_jsonl(root / "eval.jsonl", held_out), "max_length": 64, "min_rows": 8},
        "eval": {"regression_qa_path": write_jsonl(root / "qa.jsonl", held_out[:4]),
                 "regression_text_path": write_jsonl(root / "text.jsonl", [{"text": "red cat blue owl"}]),
                 "max_new_tokens": 6, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 6, "warmup_steps": 1, "save_steps": 3, "logging_steps": 2, "per_device_batch_size": 8},
        # The tiny random model never stops at EOS: the stop-rate rule is exercised in test_gate.py.
        "gate": {"min_task_gain": 0.0, "max_regression": 1.0, "min_stop_rate": 0.0},
        "registry": {"model_name": model_name, "auto_promote": True},
        "mlflow": {"system_metrics_interval": system_metrics_interval},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
