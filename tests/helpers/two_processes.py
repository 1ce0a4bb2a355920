"""One 2-process training (torchrun, gloo, on CPU) per session, shared by every module that imports the fixture.

tests/test_distributed.py, tests/test_multi_node.py and tests/reliability/test_killed_training.py import
``two_process_run``. pytest registers a fixture once per module that holds it, so without the memo here the
~15-40 s run would happen once per module; the memo lives in this module, imported under one name only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline import stages, tracking
from lora_pipeline.config_files import load_config
from lora_pipeline.formatting import format_dataset
from lora_pipeline.modeling import load_tokenizer

#: The training both the 2-process run here and the 2-machine run (tests/test_multi_node.py) do.
DDP_OVERRIDES = ["train.max_steps=6", "train.warmup_steps=1", "train.save_steps=3", "train.logging_steps=1",
                 "train.per_device_batch_size=4", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"]
_TWO_PROCESS_RUNS: dict[tuple[Path, Path], tuple] = {}


@pytest.fixture(scope="session")
def two_process_run(tiny_model_dir, tiny_rows_path, tmp_path_factory):
    """(config, output root, run dir, stage result, tracking run) of the 2-process training."""
    key = (tiny_model_dir, tiny_rows_path)
    if key not in _TWO_PROCESS_RUNS:
        _TWO_PROCESS_RUNS[key] = _train_two_processes(tiny_model_dir, tiny_rows_path, tmp_path_factory.mktemp("ddp"))
    return _TWO_PROCESS_RUNS[key]


def _train_two_processes(tiny_model_dir, tiny_rows_path, root):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={root}",
                             f"data.path={tiny_rows_path}", "train.num_processes=2", *DDP_OVERRIDES])
    run_dir = root / "runs" / "r1"
    tokenized = run_dir / "tokenized.jsonl"
    format_dataset(load_tokenizer(cfg.model), tiny_rows_path, tokenized, cfg.data.max_length)
    uri = tracking.resolve_tracking_uri(cfg.mlflow, cfg.output_dir)
    run_id = tracking.start_pipeline_run(uri, "ddp-test", root / "mlartifacts", run_name="r1", tags={})
    info = tracking.TrackingRun(tracking_uri=uri, run_id=run_id)
    result = stages.train(cfg, tokenized, run_dir, "key1", info)
    return cfg, root, run_dir, result, info
