"""Registry faults: a response lost after the version was created, a lost race, two processes at once.

Each ends with exactly one version per run key.
"""

from __future__ import annotations

import mlflow
import pytest

from tests.helpers.registry import NAME, env, first, nothing_in_cwd  # noqa: F401  (fixtures)
from tests.helpers.registry import register as _register
from tests.helpers.registry import register_in_processes as _register_in_processes


def test_registration_that_lost_a_race_returns_the_winner(env, first, monkeypatch):
    """A version for the run key appearing while the model was being logged is returned, not duplicated."""
    from lora_pipeline import registry

    real_find = registry.find_version_by_run_key
    calls = []

    def miss_first_lookup(*args):
        calls.append(args)
        return None if len(calls) == 1 else real_find(*args)

    monkeypatch.setattr(registry, "find_version_by_run_key", miss_first_lookup)
    again = _register(env, "key-1")
    assert (again.version, again.created, len(calls)) == ("1", False, 2)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    assert all(v.tags["run_key"] != "key-1" or str(v.version) == "1"
               for v in client.search_model_versions(f"name = '{NAME}'"))


def test_duplicate_created_by_a_concurrent_registration_is_removed(env, first, monkeypatch):
    """Both lookups missed (a true race): the newer version is deleted and the oldest returned."""
    from lora_pipeline import registry

    _register(env, "key-race", name="tiny-llama-race")  # the registration that won, version 1
    real_find = registry.find_version_by_run_key
    calls = []

    def miss_two_lookups(*args):
        calls.append(args)
        return None if len(calls) <= 2 else real_find(*args)

    monkeypatch.setattr(registry, "find_version_by_run_key", miss_two_lookups)
    loser = _register(env, "key-race", name="tiny-llama-race")
    assert (loser.version, loser.created, len(calls)) == ("1", False, 3)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-llama-race'")] == ["1"]


def test_two_processes_registering_one_run_get_one_version(env, tmp_path):
    results = _register_in_processes(env, "tiny-llama-same-run", ["run-x", "run-x"], tmp_path / "barrier")
    assert results[0]["version"] == results[1]["version"]
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    versions = client.search_model_versions("name = 'tiny-llama-same-run'")
    assert [str(v.version) for v in versions if v.tags.get("run_key") == "run-x"] == [results[0]["version"]]


def test_a_registration_whose_response_was_lost_is_retried_into_exactly_one_version(env, monkeypatch):
    """The registry created the version, then the connection dropped before the answer arrived: the task's
    retry (a ConnectionError is transient) finds the version by its run key instead of creating another."""
    from lora_pipeline import registry
    from lora_pipeline.errors import is_transient

    name = "tiny-llama-lost-response"
    real_client = registry.mlflow_client
    lost = []

    class LosesTheFirstAnswer:
        def __init__(self, client):
            self._client = client

        def __getattr__(self, attribute):
            return getattr(self._client, attribute)

        def create_model_version(self, *args, **kwargs):
            created = self._client.create_model_version(*args, **kwargs)  # done on the server ...
            if not lost:
                lost.append(str(created.version))
                raise ConnectionResetError("connection reset by peer")  # ... but the answer never arrives
            return created

    monkeypatch.setattr(registry, "mlflow_client", lambda uri: LosesTheFirstAnswer(real_client(uri)))
    with pytest.raises(ConnectionResetError) as first_attempt:
        _register(env, "key-lost", name=name)
    assert is_transient(first_attempt.value)  # so the register task retries it
    retried = _register(env, "key-lost", name=name)
    assert (retried.version, retried.created) == (lost[0], False)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [lost[0]]
