"""Secrets into a flow run's environment: Prefect Secret blocks named by ``secrets.env``, redacted everywhere.

Not a task on purpose: a task's parameters and result are stored by the Prefect server (and results may be
persisted), and a secret must be in neither.
"""

from __future__ import annotations

import os

from prefect.blocks.system import Secret

from lora_pipeline.config import SecretsConfig
from lora_pipeline.redaction import install_log_redaction, register_secret
from lora_pipeline.tracking_uris import credentials_into_environment


def load_secrets(secrets: SecretsConfig) -> list[str]:
    """Redact known secrets from every log record, then load each ``secrets.env`` block into its variable.

    Credentials in ``MLFLOW_TRACKING_URI`` then move to MLflow's credential variables (the URI a run
    carries around holds none; see :func:`lora_pipeline.tracking_uris.credentials_into_environment`).

    Returns:
        The names of the variables set (never their values).
    """
    install_log_redaction()  # also registers secrets already in the worker's environment
    for variable, block in secrets.env.items():
        value = Secret.load(block).get()
        register_secret(value)
        os.environ[variable] = value
    # A user:password@ tracking URI (the worker's or a block's) would ride along in every TrackingRun.
    credentials_into_environment()
    return sorted(secrets.env)
