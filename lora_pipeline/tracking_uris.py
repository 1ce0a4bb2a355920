"""Where the tracking store is: the URI a run uses, and the credentials kept out of it.

Resolution follows MLflow users' expectations (config, then ``MLFLOW_TRACKING_URI``, then a SQLite file
under ``output_dir``); credentials in the environment's URI move to MLflow's own variables, so the URI
that travels with a run holds none.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

from lora_pipeline.redaction import register_secret

if TYPE_CHECKING:
    from lora_pipeline.config import MlflowConfig


def default_tracking_uri(output_dir: Path) -> str:
    """SQLite store under the output dir, so nothing lands in the working directory.

    Args:
        output_dir: Root of all pipeline outputs (made absolute here).

    Returns:
        ``sqlite:///<abs output_dir>/mlflow.db``.
    """
    return f"sqlite:///{(Path(output_dir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(cfg: MlflowConfig, output_dir: Path) -> str:
    """The tracking URI, as MLflow users expect it: ``mlflow.tracking_uri`` (config or ``--set``) wins,
    then ``MLFLOW_TRACKING_URI`` from the environment, then :func:`default_tracking_uri`.

    Args:
        cfg: The ``mlflow`` section of the pipeline config.
        output_dir: Root of all pipeline outputs.

    Returns:
        The URI to pass to every other function of this module.
    """
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)


def credentials_into_environment(environ: MutableMapping[str, str] | None = None) -> bool:
    """Move ``user:password@`` out of ``MLFLOW_TRACKING_URI`` into ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``.

    The tracking URI travels: in every task's :class:`lora_pipeline.tracking.TrackingRun` (a cached task's result is persisted by
    Prefect), the summary, the training ranks' environment. MLflow reads basic-auth credentials from its
    two variables as well as from the URI, so the URI without them reaches the same server as the same
    user and is safe to carry anywhere. Credentials in the URI win over the variables' earlier values.

    Args:
        environ: The environment to rewrite (default: this process's).

    Returns:
        True when the URI held credentials (now moved; the password is registered for redaction).
    """
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return False
    environ["MLFLOW_TRACKING_URI"] = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    if parts.username:
        environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
        register_secret(parts.password)
        register_secret(environ["MLFLOW_TRACKING_PASSWORD"])
    return True


def registry_uri(tracking_uri: str) -> str:
    """The model registry's URI: ``MLFLOW_REGISTRY_URI`` when set (MLflow's own setting), else the tracking store."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
