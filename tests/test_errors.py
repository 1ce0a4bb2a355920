"""Transient failures are retried, permanent ones are not."""

import sqlite3

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from lora_pipeline.errors import is_transient


class HTTPError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status_code = status


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError("connection refused"), TimeoutError(), HTTPError(503), HTTPError(429),
    sqlite3.OperationalError("database is locked"), MlflowException("API request failed with error code 502"),
])
def test_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ValueError("data validation failed"), FileNotFoundError("no such file"), HTTPError(404), HTTPError(400),
    MlflowException("Registered Model with name=x not found", error_code=RESOURCE_DOES_NOT_EXIST),
    KeyError("bug"),
])
def test_permanent(exc):
    assert not is_transient(exc)


def test_a_transient_cause_anywhere_in_the_chain_counts():
    try:
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError as cause:
            raise RuntimeError("register failed") from cause
    except RuntimeError as exc:
        assert is_transient(exc)
