"""A failed task's Prefect state message (and persisted exception) carries no secret.

Prefect writes ``"<Type>: <str(exc)>"`` as the state message the UI shows and may persist the exception
as the task's result; neither passes through logging, so the log redaction does not reach them. A real
case: MLflow's connection error quotes the tracking URI, ``http://user:password@host/...``, whole.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest
from mlflow.exceptions import MlflowException

from lora_pipeline.errors import is_transient
from lora_pipeline.redaction import forget_secrets, redact_exception, register_secret
from tasks.policy import redacts_secrets


@pytest.fixture
def canary():
    value = f"canary-{uuid.uuid4().hex}"
    register_secret(value)
    yield value
    forget_secrets()


def test_an_exception_is_cleaned_in_place_along_its_chain(canary):
    uri = f"http://alice:pw-{uuid.uuid4().hex}@127.0.0.1:9"  # not registered: a credential by its shape
    try:
        try:
            raise OSError(13, f"permission denied ({canary})", f"/secrets/{canary}")
        except OSError as cause:
            failed = subprocess.CalledProcessError(1, ["curl", "-u", f"bob:{canary}", "https://x"])
            failed.add_note(f"retry with token {canary}")
            raise MlflowException(f"API request to {uri}/api/2.0/mlflow/runs/create failed") from failed
    except MlflowException as exc:
        raised = exc
    assert redact_exception(raised) is raised and type(raised) is MlflowException
    assert str(raised) == "API request to http://alice:***@127.0.0.1:9/api/2.0/mlflow/runs/create failed"
    cause, context = raised.__cause__, raised.__context__  # raised from one, while handling the other
    assert cause.cmd == ["curl", "-u", "bob:***", "https://x"] and cause.__notes__ == ["retry with token ***"]
    assert str(context) == "[Errno 13] permission denied (***): '/secrets/***'"
    assert canary not in repr([raised.args, cause.args, context.args])
    assert raised.__traceback__ is not None  # the same exception: its traceback is kept


def test_a_decorated_body_raises_the_same_exception_cleaned(canary):
    @redacts_secrets
    def stage(x: int) -> int:
        """A stage."""
        raise ConnectionResetError(f"reset while sending {canary}")

    with pytest.raises(ConnectionResetError) as raised:
        stage(1)
    assert str(raised.value) == "reset while sending ***"
    assert is_transient(raised.value)  # same type: the retry decision is unchanged
    assert stage.__doc__ == "A stage." and stage.__wrapped__.__name__ == "stage"


def test_tracking_uri_credentials_move_to_mlflows_own_variables():
    """The URI every task carries (and Prefect persists as a cached result) then holds no password."""
    from lora_pipeline.redaction import redact
    from lora_pipeline.tracking_uris import credentials_into_environment

    environ = {"MLFLOW_TRACKING_URI": "https://alice:p%40ss-w0rd-42@mlflow.internal:5000/prefix"}
    assert credentials_into_environment(environ)
    assert environ == {"MLFLOW_TRACKING_URI": "https://mlflow.internal:5000/prefix",
                       "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss-w0rd-42"}
    assert redact("p@ss-w0rd-42 / p%40ss-w0rd-42") == "*** / ***"
    forget_secrets()
    plain = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD": "x"}
    assert not credentials_into_environment(plain) and plain["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert not credentials_into_environment({})
