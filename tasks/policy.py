"""How the pipeline's tasks retry, time out and cache: one place, so every stage follows the same rules.

- Retries: only transient failures (network, a server's 5xx/429, a locked database; see
  :func:`lora_pipeline.errors.is_transient`), with exponential backoff and jitter. Bad data, a failed
  gate or a bug fail at once: retrying would only repeat them.
- Caching: the stages that compute (validate, format, train, evaluate, merge) persist their results,
  under Prefect's default cache key (task source, flow run, inputs). A retry of the flow run therefore
  takes every finished stage from cache (state ``Cached``) and runs only what failed. The inputs are
  the config and paths inside the flow run's own directory, which a retry reuses.
- Timeouts: each task has one that fits its work; training's is the longest.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from lora_pipeline.errors import is_transient

MINUTE, HOUR = 60, 3600


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own exception, classified
        return is_transient(exc)
    return False


#: Three retries after 2, 4 and 8 s (each +-50 % jitter), transient failures only.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
#: Persisted results, so a flow-run retry finds them (Prefect's default cache policy keys them).
CACHED: dict[str, Any] = {"persist_result": True}
