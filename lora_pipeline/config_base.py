"""What every section of the configuration shares: strict models, the error type, path and name rules."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


#: A registered model name: it becomes part of concurrency limits, artifact keys and registry paths.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def no_path_tricks(value: str | None, key: str) -> str | None:
    """Refuse a path that climbs out (``..``), is URL-encoded (``%2e%2e``) or holds a NUL byte.

    Checked before anything is read or written; where a path may point (the allowed roots) is checked
    where the roots are known (:mod:`lora_pipeline.run_request`).
    """
    if value is None:
        return None
    if "\x00" in value:
        raise ValueError(f"{key} holds a NUL byte")
    if re.search(r"%[0-9A-Fa-f]{2}", value):
        raise ValueError(f"{key} must be a plain path, not URL-encoded: {value!r}")
    if ".." in Path(value).parts:
        raise ValueError(f"{key} must not climb out of its directory with '..': {value!r}")
    return value
