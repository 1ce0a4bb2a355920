"""The MLflow 3 logged model a registration uploads: reused when complete, removed with its files when not.

``mlflow.transformers.log_model`` uploads the model into a *logged model* (``models/m-<id>/``) and
marks it READY when the upload finished, FAILED when it raised. A version is created only after
that, so no version ever points at a partial upload; but the partial files stay, and MLflow's
``delete_logged_model`` only marks the entity deleted (its files wait for ``mlflow gc``). Left as
they are, every retried registration would add one more full copy of the model. Hence:

- a registration first looks at the models its run already logged for the same identity (run key
  and store): a READY one is reused as it is (a retry after a failed version creation uploads
  nothing), FAILED ones and long-PENDING ones (a registration killed mid-upload) are discarded;
- a registration whose own upload fails discards what it uploaded before raising.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from lora_pipeline.tracking import mlflow_client

logger = logging.getLogger(__name__)

#: A PENDING upload older than this cannot belong to a live registration: the register task's
#: timeout is two hours. Younger ones may be another process's upload in progress and are left alone.
STALE_PENDING_SECONDS = 3 * 3600


def discard_logged_model(tracking_uri: str, model: LoggedModel) -> None:
    """Delete a logged model's files, then the model (best effort: a failure is logged, not raised).

    Args:
        tracking_uri: Tracking store URI (resolves ``mlflow-artifacts:`` locations on a server).
        model: The logged model to remove.
    """
    try:
        get_artifact_repository(model.artifact_location, tracking_uri=tracking_uri).delete_artifacts()
        mlflow_client(tracking_uri).delete_logged_model(model.model_id)
    except Exception as exc:  # cleanup must never hide the error that made it necessary
        logger.warning("could not remove logged model %s (%s); a later registration of the same run key "
                       "removes it", model.model_id, type(exc).__name__)


def _logged_models_of_run(tracking_uri: str, experiment_id: str, run_id: str) -> list[LoggedModel]:
    client = mlflow_client(tracking_uri)
    found: list[LoggedModel] = []
    page_token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                           page_token=page_token)
        found.extend(page)
        page_token = page.token
        if not page_token:
            return sorted(found, key=lambda m: m.creation_timestamp)


def reusable_logged_model(tracking_uri: str, experiment_id: str, run_id: str,
                          identity: Mapping[str, str], now: float | None = None) -> LoggedModel | None:
    """The complete model ``run_id`` already logged with the tags ``identity``; incomplete ones discarded.

    Args:
        tracking_uri: Tracking store URI.
        experiment_id: The run's experiment.
        run_id: The pipeline run the models were logged into.
        identity: Tags a model must carry to count as this registration's (run key, store).
        now: Current time in seconds (tests); defaults to ``time.time()``.

    Returns:
        The oldest READY match (later READY duplicates are discarded), or None.
    """
    now = time.time() if now is None else now
    ready: LoggedModel | None = None
    for model in _logged_models_of_run(tracking_uri, experiment_id, run_id):
        if any(model.tags.get(key) != value for key, value in identity.items()):
            continue
        status = LoggedModelStatus(model.status)
        if status == LoggedModelStatus.READY and ready is None:
            ready = model
        elif status == LoggedModelStatus.PENDING and now - model.creation_timestamp / 1000 < STALE_PENDING_SECONDS:
            logger.warning("logged model %s of this run key is still uploading (another registration?): "
                           "left in place", model.model_id)
        else:
            logger.info("discarding logged model %s (%s) left by an earlier registration", model.model_id,
                        status)
            discard_logged_model(tracking_uri, model)
    return ready
