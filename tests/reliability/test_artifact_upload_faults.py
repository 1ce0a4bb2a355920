"""An artifact upload that fails half way: no version points at partial files, and a retry leaves no orphan.

The faults are injected into MLflow's own local artifact repository (the one a ``sqlite`` store with a
local artifact root uses): the upload copies part of the model's files, then the connection drops.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from lora_pipeline import tracking
from lora_pipeline.config import RegistryConfig
from lora_pipeline.errors import is_transient
from lora_pipeline.logged_models import STALE_PENDING_SECONDS, reusable_logged_model
from lora_pipeline.registry import register_model
from tests.helpers.registry import PROMPT, env  # noqa: F401  (fixture)

NAME = "tiny-upload-faults"
LINEAGE = {"data_hash": "d41d8cd9", "config_hash": "0123abcd"}
_real_log_artifacts = LocalArtifactRepository.log_artifacts


@pytest.fixture(scope="module")
def store(env):
    """The registry tests' tiny model and tracking store, and the local artifact root uploads land in."""
    return {**env, "model": env["model"].path, "artifacts": env["out"] / "mlartifacts"}


def _new_run(store, name: str) -> str:
    return tracking.start_pipeline_run(store["uri"], "exp", store["artifacts"], name, {})


def _register(store, run_id: str, run_key: str, name: str = NAME):
    return register_model(tracking_uri=store["uri"], run_id=run_id, model_dir=store["model"],
                          registry_cfg=RegistryConfig(model_name=name), run_key=run_key, tags=LINEAGE,
                          input_example=PROMPT, adapter_dir=store["adapter"])


def _model_uploads(store) -> list[Path]:
    """Every logged-model directory holding files under the artifact root (one per stored copy)."""
    return sorted(d for d in store["artifacts"].rglob("models/m-*") if d.is_dir() and any(d.rglob("*.*")))


def _client(store) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(store["uri"], registry_uri=store["uri"])


def _live_logged_models(store, run_id: str) -> list:
    client = _client(store)
    experiment = client.get_run(run_id).info.experiment_id
    return list(client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"))


def _versions(store, name: str) -> list:
    return _client(store).search_model_versions(f"name = '{name}'")


def _is_model_upload(repo: LocalArtifactRepository) -> bool:
    return "/models/m-" in repo.artifact_dir.replace(os.sep, "/")


def test_an_upload_that_fails_half_way_leaves_no_version_no_files_and_the_retry_one_copy(store, monkeypatch):
    run_id = _new_run(store, "half-way")

    def drops_half_way(repo, local_dir, artifact_path=None):
        if not _is_model_upload(repo):
            return _real_log_artifacts(repo, local_dir, artifact_path)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        destination = Path(repo.artifact_dir) / (artifact_path or "")
        for source in files[: len(files) // 2]:  # half of the model reaches the store ...
            target = destination / source.relative_to(local_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        raise ConnectionResetError("connection reset by peer")  # ... then the connection drops

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", drops_half_way)
    with pytest.raises(ConnectionResetError) as failed:
        _register(store, run_id, "key-half-way")
    assert is_transient(failed.value)  # so the register task retries it
    assert _versions(store, NAME) == []  # no version points at the partial upload
    assert _live_logged_models(store, run_id) == []
    assert _model_uploads(store) == []  # and its files are gone, not left for `mlflow gc`

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", _real_log_artifacts)
    retried = _register(store, run_id, "key-half-way")
    assert retried.created
    versions = _versions(store, NAME)
    assert [v.version for v in versions] == [int(retried.version)]
    (logged,) = _live_logged_models(store, run_id)
    assert versions[0].source == f"models:/{logged.model_id}" and logged.status == LoggedModelStatus.READY
    (upload,) = _model_uploads(store)  # exactly one stored copy of the model
    assert upload.name == logged.model_id and (upload / "artifacts" / "MLmodel").is_file()
    assert (upload / "artifacts" / "model" / "model.safetensors").is_file()


def test_a_retry_after_the_version_creation_failed_reuses_the_upload_instead_of_copying_it_again(store,
                                                                                                  monkeypatch):
    """503 on create_model_version (after a complete upload), then OK: one upload, one copy, one version."""
    name = f"{NAME}-503"
    run_id = _new_run(store, "version-503")
    uploads_before = set(_model_uploads(store))
    uploads = []

    def counts_uploads(repo, local_dir, artifact_path=None):
        if _is_model_upload(repo):
            uploads.append(repo.artifact_dir)
        return _real_log_artifacts(repo, local_dir, artifact_path)

    real_create = mlflow.MlflowClient.create_model_version
    unavailable = []

    def unavailable_once(client, *args, **kwargs):
        if not unavailable:
            unavailable.append(1)
            raise MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")
        return real_create(client, *args, **kwargs)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", counts_uploads)
    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", unavailable_once)
    with pytest.raises(MlflowException) as failed:
        _register(store, run_id, "key-503", name=name)
    assert is_transient(failed.value)
    retried = _register(store, run_id, "key-503", name=name)
    assert retried.created and len(uploads) == 1  # the retry uploaded nothing
    (logged,) = _live_logged_models(store, run_id)
    assert [v.source for v in _versions(store, name)] == [f"models:/{logged.model_id}"]
    assert [d.name for d in set(_model_uploads(store)) - uploads_before] == [logged.model_id]


def test_incomplete_uploads_left_by_dead_registrations_are_removed_and_live_ones_left_alone(store):
    """A FAILED upload, and a PENDING one older than any registration can take (its process was
    killed), are removed with their files; a young PENDING one may be another process's upload in
    progress and is kept; a READY one is what a retry reuses."""
    run_id = _new_run(store, "leftovers")
    client = _client(store)
    experiment = client.get_run(run_id).info.experiment_id
    identity = {"run_key": "key-leftovers", "store": "merged"}

    def upload(status: LoggedModelStatus | None):
        logged = client.create_logged_model(experiment, name="model", source_run_id=run_id, tags=identity)
        client.log_model_artifacts(logged.model_id, str(store["model"]))
        if status is not None:
            client.finalize_logged_model(logged.model_id, status)
        return logged.model_id

    failed, pending, ready = upload(LoggedModelStatus.FAILED), upload(None), upload(LoggedModelStatus.READY)
    other_key = client.create_logged_model(experiment, name="model", source_run_id=run_id,
                                           tags={**identity, "run_key": "another"}).model_id
    uploaded = {d.name for d in _model_uploads(store)}
    assert {failed, pending, ready} <= uploaded

    now = time.time()
    assert reusable_logged_model(store["uri"], experiment, run_id, identity, now=now).model_id == ready
    live = {m.model_id for m in _live_logged_models(store, run_id)}
    assert live == {pending, ready, other_key}  # the FAILED one is gone ...
    assert failed not in {d.name for d in _model_uploads(store)}  # ... with its files

    later = now + STALE_PENDING_SECONDS + 60
    assert reusable_logged_model(store["uri"], experiment, run_id, identity, now=later).model_id == ready
    assert {m.model_id for m in _live_logged_models(store, run_id)} == {ready, other_key}
    assert pending not in {d.name for d in _model_uploads(store)}
