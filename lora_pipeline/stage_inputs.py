"""What each stage's result depends on, by content: the inputs of its :class:`~lora_pipeline.reuse.StageRecord`.

Each function returns the parts of one stage's record key, or None when one of them cannot be known
here (data from the hub, lm-evaluation-harness tasks whose data come from the hub): such a stage always
runs. Locations never enter (``model.name_or_path``, ``data.path``, the run directory): the bytes they
point at do. Only the config sections a stage reads enter, so a new learning rate retrains and
re-scores the candidate but reuses the data stage and the base's scores.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from lora_pipeline.base_model import base_fingerprint
from lora_pipeline.config import BASE_ANSWERS, PipelineConfig
from lora_pipeline.reuse import content_digest, key_of, model_files_digest
from lora_pipeline.suites import GENERAL_PROMPTS, load_eval_suites

#: Config keys that are locations: what they point at enters a key as a content digest instead.
_MODEL_LOCATION, _DATA_LOCATIONS = {"name_or_path"}, {"path", "eval_path"}


def fingerprint(name_or_path: str, revision: str | None) -> str:
    """:func:`lora_pipeline.base_model.base_fingerprint`, hashed once per process while the files' sizes and
    modification times stay the same (the assets stage and every stage key ask for it)."""
    return _base_fingerprint(name_or_path, revision, _stat_signature(name_or_path))


def _model(cfg: PipelineConfig) -> dict[str, Any]:
    """The base (weights and its other files, tokenizer included) and the ``model`` settings."""
    name_or_path, revision = cfg.model.name_or_path, cfg.model.revision
    return {"base": fingerprint(name_or_path, revision), "base_files": model_files_digest(name_or_path),
            "model": cfg.model.model_dump(mode="json", exclude=_MODEL_LOCATION)}


def _stat_signature(name_or_path: str) -> tuple[tuple[str, int, int], ...]:
    path = Path(name_or_path).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@lru_cache(maxsize=8)
def _base_fingerprint(name_or_path: str, revision: str | None, stat: tuple) -> str:
    return base_fingerprint(name_or_path, revision)


def _data(cfg: PipelineConfig) -> dict[str, Any]:
    return cfg.data.model_dump(mode="json", exclude=_DATA_LOCATIONS)


def _eval_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """``eval.*``, with the suite files' locations left out (their rows enter through the suites)."""
    settings = cfg.eval.model_dump(mode="json")
    for key in ("regression_qa_path", "regression_text_path"):
        if settings[key] not in (None, BASE_ANSWERS):
            settings[key] = "file"
    return settings


def validate_inputs(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The data stage: the training rows, the held-out files it decontaminates against, ``data.*`` and the
    tokenizer (it templates and truncates every row as training will)."""
    qa = cfg.eval.regression_qa_path
    files = {"data": content_digest(cfg.data.path),
             "eval_rows": content_digest(cfg.data.eval_path) if cfg.data.eval_path else "none",
             "regression_qa": content_digest(GENERAL_PROMPTS if qa == BASE_ANSWERS else qa) if qa else "none"}
    if None in files.values():  # a hub dataset: its content is not known here
        return None
    return {**files, "data_settings": _data(cfg), "regression_qa_setting": _eval_settings(cfg)["regression_qa_path"],
            **_model(cfg)}


def format_inputs(cfg: PipelineConfig, clean_path: Path) -> dict[str, Any]:
    """Formatting: the clean rows, ``data.*`` and the tokenizer with its chat template."""
    return {"clean_rows": content_digest(clean_path), "data_settings": _data(cfg), **_model(cfg)}


def train_inputs(cfg: PipelineConfig, tokenized_path: Path, run_key: str) -> dict[str, Any]:
    """Training: the run key (base, clean data, ``model``/``data``/``lora``/``quant``/``train``, library
    versions) and the tokenized samples themselves."""
    return {"run_key": run_key, "tokenized": content_digest(tokenized_path), **_model(cfg)}


def _suites(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any] | None:
    """The rows every scored model sees (task rows, regression Q/A or the base's references, general text)."""
    if any(suite.startswith("lm_eval:") for suite in cfg.eval.suites):
        return None  # their data come from the hub, by task name: not known here
    return asdict(load_eval_suites(cfg, run_dir))


def _digest(rows: Any) -> str:
    """A digest of JSON-able rows (the record keeps it, not the rows)."""
    return key_of({"rows": rows})


def evaluate_inputs(cfg: PipelineConfig, run_dir: Path, label: str, adapter_dir: Path | None) -> dict[str, Any] | None:
    """One evaluation: which model (base files, quantisation, the adapter's bytes), the suites' rows and
    ``eval.*`` (with ``data.max_length`` and ``data.format``, which scoring reads)."""
    suites = _suites(cfg, run_dir)
    if suites is None:
        return None
    return {"label": label, **_model(cfg), "quant": cfg.quant.model_dump(mode="json"),
            "adapter": content_digest(adapter_dir) if adapter_dir else "none", "suites": _digest(suites),
            "eval_settings": _eval_settings(cfg), "scoring": {"max_length": cfg.data.max_length,
                                                              "format": cfg.data.format}}


def champion_inputs(cfg: PipelineConfig, run_dir: Path, champion: dict[str, Any]) -> dict[str, Any] | None:
    """The champion's evaluation: the registered version (registry, name, number and lineage tags) in place
    of an adapter; the rest as :func:`evaluate_inputs`."""
    scored = evaluate_inputs(cfg, run_dir, "champion", None)
    return None if scored is None else {**scored, "champion": champion}


def merge_inputs(cfg: PipelineConfig, adapter_dir: Path, run_dir: Path) -> dict[str, Any] | None:
    """The merge: the base, the adapter's bytes, ``quant.*``, ``merge.*`` and the parity prompts (task rows)."""
    suites = _suites(cfg, run_dir)
    if suites is None:
        return None
    return {**_model(cfg), "quant": cfg.quant.model_dump(mode="json"), "adapter": content_digest(adapter_dir),
            "merge_settings": cfg.merge.model_dump(mode="json"),
            "parity_rows": _digest([suites["task"], suites["task_text"]])}


def dequantized_base_inputs(cfg: PipelineConfig, device_type: str) -> dict[str, Any]:
    """The de-quantised base that adapter-form versions reference: the base, ``quant.*`` and the device type
    (its kernels quantise and de-quantise)."""
    return {**_model(cfg), "quant": cfg.quant.model_dump(mode="json"), "device": device_type}
