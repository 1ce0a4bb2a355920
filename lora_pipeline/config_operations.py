"""The operations sections of the configuration: where a run is tracked, registered, announced, and which
secrets it loads. Nothing here changes what is trained (none of it is in the run key)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from lora_pipeline.config_base import MODEL_NAME_PATTERN, Strict


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(
        None, description="Tracking URI; default MLFLOW_TRACKING_URI, else sqlite under output_dir. No credentials: "
        "MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or _TOKEN) from the environment, which "
        "secrets.env can fill from Prefect Secret blocks.")
    experiment_name: str = Field("lora-pipeline", description="Experiment holding the pipeline runs.")

    system_metrics_interval: float = Field(
        10.0, ge=0, description="Seconds between system-metric samples (CPU, memory, disk, network, GPU) while "
        "training; 0 turns them off.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri and re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s]*:[^/\s]+@", uri):
            raise ValueError("mlflow.tracking_uri must not hold a password (a config file is no place for one): "
                             "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the worker's environment, "
                             "or name a Prefect Secret block for them under secrets.env")
        return uri


class RegistryConfig(Strict):
    model_name: str = Field("lora-pipeline-demo", pattern=MODEL_NAME_PATTERN,
                            description="Registered model name: letters, digits, '.', '_' and '-' (it names "
                            "concurrency limits, artifact keys and registry paths).")
    auto_promote: bool = Field(False, description="Move the `champion` alias to a candidate that passed the gate "
                               "(the old champion becomes `previous`); off: promote by hand.")
    store: Literal["merged", "adapter"] = Field(
        "merged", description="What a registered version holds: merged = the full merged model (self-contained, "
        "base-sized); adapter = only the LoRA adapter and a reference to its base model's local directory (for large "
        "bases; the base must be at that path, or be passed, wherever the version is loaded). Chooses for versions "
        "that passed the gate; one that failed is stored as adapter.")


class NotifyConfig(Strict):
    block: str | None = Field(
        None, pattern=r"^[a-z0-9-]+/[A-Za-z0-9_.-]+$",
        description="Prefect notification block that tells people about a failed run or a rejected candidate, as "
        "`<block-type-slug>/<block name>` (e.g. `slack-webhook/ml-oncall`, `custom-webhook/lora-alerts`); its URL and "
        "credentials live in the block, never in this file. null: Prefect events only (automations can match "
        "`lora-pipeline.run.failed` and `lora-pipeline.gate.rejected`).")
    on_failure: bool = Field(True, description="Notify when a run fails.")
    on_gate_rejected: bool = Field(True, description="Notify when the gate rejects a candidate.")


class SecretsConfig(Strict):
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variable -> Prefect Secret block name, e.g. {HF_TOKEN: hf-token, "
        "MLFLOW_TRACKING_PASSWORD: mlflow-password}: a flow run loads each block into its environment before its "
        "first stage, and the values are redacted from its logs, summary, notices and MLflow params and tags. "
        "Block names only; the values never appear in a config file or a run parameter.")

    @field_validator("env")
    @classmethod
    def _names_only(cls, env: dict[str, str]) -> dict[str, str]:
        for variable, block in env.items():
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", variable):
                raise ValueError(f"secrets.env: {variable!r} is not an environment variable name (A-Z, 0-9, _)")
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", block):
                raise ValueError(f"secrets.env.{variable}: {block!r} is not a Prefect block name (lowercase letters, "
                                 "digits, dashes): name the Secret block here, never the secret itself")
        return env
