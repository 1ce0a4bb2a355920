"""MLflow tracking without global state: every call names its tracking URI and run explicitly.

One MLflow run per pipeline run. Functions take ``tracking_uri`` + ``run_id`` and use an
``MlflowClient`` built for that URI, so two pipeline runs in one process (or a Prefect worker
reusing its interpreter) never share an "active run". Anything shown to MLflow (params, tags) goes
through :func:`mask_secrets` first: MLflow stores and displays those values verbatim.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from lora_pipeline.redaction import MASK, mask_secrets
# Where the store is (re-exported: callers use ``tracking.resolve_tracking_uri`` and friends).
from lora_pipeline.tracking_uris import (  # noqa: F401
    credentials_into_environment,
    default_tracking_uri,
    registry_uri,
    resolve_tracking_uri,
)

logger = logging.getLogger(__name__)

# Serialises our own switches of MLflow's process-global URIs (Prefect may run tasks in threads).
_FLUENT_LOCK = threading.RLock()

# A config key is secret-looking when one of its words (split on _ - . or case) is one of these;
# whole words only, so ``max_new_tokens`` or ``tokenizer`` are not masked but ``hf_token`` is.
_SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "key", "apikey", "credential", "credentials"})


@dataclass(frozen=True)
class TrackingRun:
    """The pipeline run's single MLflow run: the store it lives in and its id (what tasks pass around)."""

    tracking_uri: str
    run_id: str


def _is_secret_key(key: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    return bool(_SECRET_WORDS.intersection(re.split(r"[^a-z0-9]+", words)))


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping to dotted string params, with secrets masked.

    Args:
        tree: Nested mapping, e.g. ``cfg.model_dump(mode="json")``.
        prefix: Dotted prefix for the keys (used by the recursion).

    Returns:
        ``{"lora.r": "16", ...}``. Lists become JSON; values under secret-looking keys (token,
        password, secret, key, ...) become ``***`` unless empty/None; all values pass through
        :func:`mask_secrets`.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{dotted}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
        if _is_secret_key(str(key)) and value not in (None, ""):
            text = MASK
        flat[dotted] = mask_secrets(text)
    return flat


def mlflow_client(tracking_uri: str) -> mlflow.MlflowClient:
    """A client bound to ``tracking_uri``, and to :func:`registry_uri` for the registry.

    Args:
        tracking_uri: Tracking store URI; for ``sqlite:///`` its directory is created.

    Returns:
        The client.
    """
    if mask_secrets(tracking_uri) != tracking_uri:
        # MLflow prints "View run ... at: <URI>" to stdout when a run ends, password included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # SQLite creates the database file but not its directory.
    registry = registry_uri(tracking_uri)
    for uri in {tracking_uri, registry}:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry)


def open_local_store(tracking_uri: str) -> None:
    """Open a local store (SQLite, files) now, so that the run's first tracking call finds it open.

    MLflow opens a store once per process and URI, and opening a SQLite store checks (or creates) its
    schema: 1.7 s on 2 cores. ``lora-pipeline run`` does it while Prefect's temporary server starts. A
    tracking server (``http(s)://``) has nothing to open: nothing is done.

    Raises:
        MlflowException: the store cannot be opened (the run's own first call would say the same).
    """
    if not is_tracking_server(tracking_uri):
        mlflow_client(tracking_uri).search_experiments(max_results=1)


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _log_batched(tracking_uri: str, run_id: str, kind: str, items: list[Any], size: int) -> None:
    # log_batch caps entities per request (100 params/tags, 1000 metrics).
    client = mlflow_client(tracking_uri)
    for start in range(0, len(items), size):
        client.log_batch(run_id, **{kind: items[start : start + size]})


def is_tracking_server(tracking_uri: str) -> bool:
    """True for a remote MLflow server (``http(s)://``, ``databricks``), False for a local store (SQLite, files)."""
    return tracking_uri.startswith(("http://", "https://", "databricks"))


def run_url(tracking_uri: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server (credentials removed); None for a local store,
    whose UI (``mlflow ui --backend-store-uri ...``) has no fixed address."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    experiment_id = mlflow_client(tracking_uri).get_run(run_id).info.experiment_id
    base = re.sub(r"//[^/@]*@", "//", tracking_uri.rstrip("/"))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def ensure_experiment(tracking_uri: str, experiment_name: str, artifact_root: Path) -> str:
    """Get or create the experiment; with a local store, a new one stores artifacts under ``artifact_root``.

    Explicit because MLflow's default artifact location (SQLite store) is ``./mlruns`` in the CWD. A
    tracking server's own artifact location is kept.

    Args:
        tracking_uri: Tracking store URI.
        experiment_name: Experiment to use.
        artifact_root: Local directory for this experiment's artifacts (made absolute).

    Returns:
        The experiment id.

    Raises:
        MlflowException: the store is unreachable or refuses the experiment.
    """
    client = mlflow_client(tracking_uri)
    # A tracking *server* keeps artifacts where it serves them from (--serve-artifacts, S3, ...): a path
    # on this machine would be wrong on every other one. Only a local store gets a local directory.
    location = None if is_tracking_server(tracking_uri) else Path(artifact_root).expanduser().resolve().as_uri()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            return client.create_experiment(experiment_name, artifact_location=location)
        except MlflowException:
            # Another process may have created it between our lookup and create.
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if location is not None and experiment.artifact_location != location:
        logger.warning("experiment %r keeps its artifact location %s (asked for %s)",
                       experiment_name, mask_secrets(experiment.artifact_location), location)
    return experiment.experiment_id


def start_pipeline_run(
    tracking_uri: str,
    experiment_name: str,
    artifact_root: Path,
    run_name: str,
    tags: Mapping[str, str],
) -> str:
    """Create a RUNNING run (not the fluent "active run") in the experiment.

    Args:
        tracking_uri: Tracking store URI.
        experiment_name: Experiment, created under ``artifact_root`` if absent.
        artifact_root: See :func:`ensure_experiment`.
        run_name: Display name of the run.
        tags: Run tags; values are masked.

    Returns:
        The run id; pass it to the other functions.
    """
    experiment_id = ensure_experiment(tracking_uri, experiment_name, artifact_root)
    run = mlflow_client(tracking_uri).create_run(experiment_id, run_name=run_name, tags=masked_tags(tags))
    return run.info.run_id


def masked_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tag values as strings, secrets masked, cut to MLflow's run-tag limit (8000 chars).

    Args:
        tags: Tag name -> value.

    Returns:
        The masked tags.
    """
    return {str(k): _truncate(mask_secrets(str(v)), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches; values longer than MLflow's limit are truncated (with ``...``).

    Args:
        tracking_uri: Tracking store URI.
        run_id: Run to log to.
        params: Already flattened (see :func:`flatten_config`, which also masks secret-looking keys); every
            value is masked of credentials here once more.

    Raises:
        MlflowException: e.g. a param already logged on this run with a different value.
    """
    items = [Param(str(k), _truncate(mask_secrets(str(v)), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
    _log_batched(tracking_uri, run_id, "params", items, MAX_PARAMS_TAGS_PER_BATCH)


def log_metrics(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None
) -> None:
    """Log numeric metrics at one step (0 when not given), in batches.

    Args:
        tracking_uri: Tracking store URI.
        run_id: Run to log to.
        metrics: Name -> value.
        step: Training step the values belong to.
    """
    now = int(time.time() * 1000)
    items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
    _log_batched(tracking_uri, run_id, "metrics", items, MAX_METRICS_PER_BATCH)


def log_step_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """A training metrics sink: each log dict under ``train/`` at its optimizer step."""
    log_metrics(tracking_uri, run_id, {f"train/{k}": v for k, v in metrics.items()}, step=step)


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_seconds: float) -> Iterator[None]:
    """Sample CPU/memory/disk/network (and GPU when present) into the run while the block runs.

    MLflow's monitor logs ``system/*`` metrics every ``interval_seconds`` from a background thread;
    ``interval_seconds`` 0 does nothing.
    """
    if interval_seconds <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_seconds, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_artifacts(
    tracking_uri: str, run_id: str, local_dir_or_file: Path, artifact_path: str | None = None
) -> None:
    """Upload a file or a directory's contents into the run's artifacts.

    Args:
        tracking_uri: Tracking store URI.
        run_id: Run to log to.
        local_dir_or_file: What to upload.
        artifact_path: Sub-directory in the run's artifacts (root when None).

    Raises:
        FileNotFoundError: ``local_dir_or_file`` does not exist.
    """
    path = Path(local_dir_or_file)
    client = mlflow_client(tracking_uri)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"nothing to log at {path}")


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Set (masked, length-limited) tags on a run.

    Args:
        tracking_uri: Tracking store URI.
        run_id: Run to tag.
        tags: Tag name -> value.
    """
    items = [RunTag(k, v) for k, v in masked_tags(tags).items()]
    _log_batched(tracking_uri, run_id, "tags", items, MAX_PARAMS_TAGS_PER_BATCH)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run terminated.

    Args:
        tracking_uri: Tracking store URI.
        run_id: Run to end.
        status: ``FINISHED``, ``FAILED`` or ``KILLED``.

    Raises:
        ValueError: unknown status.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    mlflow_client(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def fluent_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's *global* tracking/registry URI at ``tracking_uri``, restoring it afterwards.

    For the few MLflow APIs that only use the global URI (``mlflow.transformers.log_model``,
    ``models:/`` URI resolution). Blocks of this function are serialised by a lock, but a thread
    making its own fluent MLflow calls at the same moment would see this URI.

    Args:
        tracking_uri: URI to use inside the block.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if mask_secrets(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # as in mlflow_client

    with _FLUENT_LOCK:
        saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        # Module globals (private): set_*_uri(None) would also wipe env vars the user set themselves.
        saved_globals = (tracking_utils._tracking_uri, registry_utils._registry_uri)
        registry = registry_uri(tracking_uri)  # read before the env vars below are touched
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_globals[0])
            registry_utils._registry_uri = saved_globals[1]
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

