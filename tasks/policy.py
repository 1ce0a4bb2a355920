"""How the pipeline's tasks retry, time out and cache: one place, so every stage follows the same rules.

- Retries: only transient failures (network, a server's 5xx/429, a locked database; see
  :func:`lora_pipeline.errors.is_transient`), with exponential backoff and jitter. Bad data, a failed
  gate or a bug fail at once: retrying would only repeat them.
- Caching, two levels:
  - within a flow run: the stages that compute (validate, format, train, evaluate, merge) persist their
    results under Prefect's default cache key (task source, flow run, inputs). A retry of the flow run
    therefore takes every finished stage from cache (state ``Cached``) and runs only what failed. The
    inputs are the config and paths inside the flow run's own directory, which a retry reuses.
  - across flow runs: a new flow run has a new id and directory, so Prefect's key never matches; the
    stages themselves reuse an earlier run's outputs when their inputs are the same by content
    (:mod:`lora_pipeline.reuse`: records under ``<output_dir>/cache/stages``, every file checked before
    use, linked into the new run's directory). The run summary marks such stages ``cached``. Prefect's
    cache cannot do this part: a hit returns a value without running code, so nothing would check the
    files behind it or put them in the new run's directory.
- Timeouts: each task has one that fits its work; training's is the longest.
- Secrets: :func:`redacts_secrets` cleans a task's exception before Prefect turns it into the
  state message and the persisted result, which no log redaction reaches.
- Concurrency: :func:`one_run_per_model` holds a per-model global concurrency limit (one slot) from
  training to registration, so two runs of the same model never train or register at once; runs of
  different models proceed in parallel.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, ParamSpec, TypeVar

from prefect.tasks import exponential_backoff

from lora_pipeline.errors import is_transient
from lora_pipeline.redaction import redact_exception

P, R = ParamSpec("P"), TypeVar("R")

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
#: Persisted results, so a flow-run retry finds them (Prefect's default cache policy keys them by flow run).
CACHED: dict[str, Any] = {"persist_result": True}


def redacts_secrets(fn: Callable[P, R]) -> Callable[P, R]:
    """Put under ``@task``: an exception leaves the task's body with every known secret masked.

    Prefect records a failure as the state message ``"<Type>: <str(exc)>"`` and may persist the exception
    itself as the task's result; a connection error that quotes ``http://user:password@host`` would carry
    the password into the UI and the result store. :func:`lora_pipeline.redaction.redact_exception` cleans
    it in place (same type, so retry decisions and ``except`` clauses are unchanged).

    Not for flows: Prefect validates a flow's parameters against the annotations of the function it
    wraps, resolved in that function's module, which a wrapper defined here would not be.
    """
    @functools.wraps(fn)  # Prefect reads the signature (parameters) and source (cache key) through __wrapped__
    def body(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            redact_exception(exc)
            raise

    return body


def model_concurrency_limit(model_name: str) -> str:
    """The global concurrency limit that serialises runs of one registered model (``model-<name>``).

    Prefect refuses ``/ % & > <`` in limit names; a model name may hold them, so they become ``-``.
    """
    return "model-" + re.sub(r"[/%&><\s]", "-", model_name)


@contextmanager
def one_run_per_model(model_name: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the model's concurrency slot: two runs of the same model never train or register at once.

    The limit (one slot) is created on first use; an operator may raise it in the UI or with
    ``prefect gcl update model-<name> --limit N``, and that choice is kept. A second run waits for the
    slot (up to ``timeout_seconds``; None waits as long as it takes). A crashed holder's slot is freed
    when its lease expires.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = model_concurrency_limit(model_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

            with suppress(ObjectAlreadyExists):  # another run created it meanwhile: the same limit
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
