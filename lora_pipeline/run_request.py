"""What a flow run may be asked to do, and by whom.

A run started from the Prefect UI or API (a deployment's run form) can choose a config file under the
worker's config roots and a few typed, harmless settings (:class:`RunOverrides`). Everything that names
a place to write, a server to talk to or code to run (``output_dir``, ``mlflow.tracking_uri``,
``model.trust_remote_code``, where the summary goes, ...) comes only from that config file or from the
worker's environment, which the person clicking "Run" does not control:

- ``LORA_PIPELINE_CONFIG_ROOTS``: extra directories config files may be read from (``os.pathsep``-separated;
  the repository's ``configs/`` always counts);
- ``LORA_PIPELINE_OVERRIDES``: ``a.b=c`` overrides as a JSON list, applied before the run's own;
- ``LORA_PIPELINE_SUMMARY_JSON``: also write the run summary to this path;
- ``LORA_PIPELINE_DATA_ROOTS``: directories a run form's ``data_path`` may point into, besides the config
  roots (symlinks are resolved first, so a link out of them is refused too).

``lora-pipeline run`` is its own worker: it puts its ``--config`` directory, ``--set`` overrides and
``--summary-json`` in these variables for the flow it runs in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lora_pipeline.config import MODEL_NAME_PATTERN, ConfigError, PipelineConfig
from lora_pipeline.config_files import load_config

CONFIG_ROOTS_ENV = "LORA_PIPELINE_CONFIG_ROOTS"
OVERRIDES_ENV = "LORA_PIPELINE_OVERRIDES"
SUMMARY_JSON_ENV = "LORA_PIPELINE_SUMMARY_JSON"
DATA_ROOTS_ENV = "LORA_PIPELINE_DATA_ROOTS"
#: The repository's own configs: always readable by a run.
PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: Run-form field -> config key. Everything else is refused: see :class:`RunOverrides`.
ALLOWED_OVERRIDES = {
    "data_path": "data.path",
    "train_max_steps": "train.max_steps",
    "train_learning_rate": "train.learning_rate",
    "lora_r": "lora.r",
    "registry_model_name": "registry.model_name",
}


class RunOverrides(BaseModel):
    """The settings a run form may change (the Prefect UI renders this as a validated form).

    Anything else, ``model.trust_remote_code``, ``output_dir`` or ``mlflow.tracking_uri`` above all, is
    refused: such keys come from the deployment's config file or the worker's environment.
    """

    model_config = ConfigDict(extra="forbid")

    data_path: str | None = Field(None, description="Training data (data.path): a file or dataset directory under the "
                                  "worker's data roots (LORA_PIPELINE_DATA_ROOTS) or config roots.")
    train_max_steps: int | None = Field(None, gt=0, description="Optimizer steps (train.max_steps).")
    train_learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (train.learning_rate).")
    lora_r: int | None = Field(None, gt=0, description="LoRA rank (lora.r).")
    registry_model_name: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN, description="Registered model name (registry.model_name): letters, digits, "
        "'.', '_' and '-'.")

    @model_validator(mode="before")
    @classmethod
    def _only_allowed_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            refused = [str(key) for key in data if key not in ALLOWED_OVERRIDES]
            if refused:
                raise ValueError(
                    f"a run cannot set {', '.join(refused)}: a run form may change only "
                    f"{', '.join(ALLOWED_OVERRIDES.values())}; settings that name a place to write, a server or "
                    "code to run come from the deployment's config file or the worker's environment")
        return data

    def as_overrides(self) -> list[str]:
        """The set fields as ``a.b=c`` overrides (values as JSON, which ``--set`` parses as YAML)."""
        return [f"{ALLOWED_OVERRIDES[name]}={json.dumps(value)}" for name, value in self.model_dump().items()
                if value is not None]


def config_roots(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Directories a run may read its config file from."""
    extra = [Path(p).expanduser().resolve() for p in environ.get(CONFIG_ROOTS_ENV, "").split(os.pathsep) if p]
    return [PROJECT_CONFIGS, *extra]


def load_run_config(config_path: str | None, overrides: RunOverrides | None,
                    environ: Mapping[str, str] = os.environ) -> PipelineConfig:
    """The validated config of one flow run: the config file, then the worker's overrides, then the run's.

    Args:
        config_path: A config file under :func:`config_roots` (relative paths: under the repository's
            ``configs/`` or the working directory); None for the embedded defaults (the demo).
        overrides: The run form's typed settings.
        environ: The worker's environment (see the module docstring).

    Raises:
        ConfigError: the file is outside the config roots, or the merged config is invalid.
    """
    path = None
    if config_path is not None:
        path = _readable_config(config_path, config_roots(environ))
    if overrides is not None and overrides.data_path is not None:
        _readable_data(overrides.data_path, data_roots(environ))
    worker = json.loads(environ.get(OVERRIDES_ENV, "[]"))
    return load_config(path, [*worker, *(overrides.as_overrides() if overrides else [])])


def data_roots(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Directories a run form's ``data_path`` may point into: the config roots and ``LORA_PIPELINE_DATA_ROOTS``."""
    extra = [Path(p).expanduser().resolve() for p in environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p]
    return [*config_roots(environ), *extra]


def _readable_data(data_path: str, roots: list[Path]) -> None:
    resolved = Path(data_path).expanduser().resolve()  # symlinks and .. resolved before the check
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ConfigError(f"data_path {data_path}: a run may only read data under "
                          f"{', '.join(str(root) for root in roots)} (the worker sets {DATA_ROOTS_ENV} for more)")


def _readable_config(config_path: str, roots: list[Path]) -> Path:
    candidate = Path(config_path).expanduser()
    if not candidate.is_absolute() and not candidate.exists():
        candidate = PROJECT_CONFIGS.parent / candidate  # e.g. configs/demo.yaml, from any working directory
    resolved = candidate.resolve()  # symlinks and .. resolved before the check
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ConfigError(f"config_path {config_path}: a run may only read config files under "
                          f"{', '.join(str(root) for root in roots)} (the worker sets {CONFIG_ROOTS_ENV} for more)")
    return resolved


@contextlib.contextmanager
def as_worker(config_path: Path | str | None, overrides: Sequence[str] = (),
              summary_json: Path | str | None = None) -> Iterator[None]:
    """Be the worker of an in-process flow run (``lora-pipeline run``, tests): inside the block, the
    environment lets the flow read ``config_path``, apply ``overrides`` and write ``summary_json``."""
    environ = {OVERRIDES_ENV: json.dumps(list(overrides))}
    if config_path is not None:
        environ[CONFIG_ROOTS_ENV] = str(Path(config_path).expanduser().resolve().parent)
    if summary_json is not None:
        environ[SUMMARY_JSON_ENV] = str(Path(summary_json).expanduser().resolve())
    saved = {key: os.environ.get(key) for key in (CONFIG_ROOTS_ENV, OVERRIDES_ENV, SUMMARY_JSON_ENV)}
    os.environ.update(environ)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
