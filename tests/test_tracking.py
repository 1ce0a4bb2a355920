"""MLflow tracking helpers: secrets never reach MLflow, nothing lands in the working directory."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from lora_pipeline import redaction, tracking
from lora_pipeline.config import MlflowConfig


@pytest.fixture(autouse=True)
def nothing_in_cwd(mlflow_workdir):
    yield
    assert sorted(p.name for p in mlflow_workdir.iterdir()) == []  # no ./mlruns, no ./mlflow.db


@pytest.fixture(scope="module")
def store(mlflow_workdir, tmp_path_factory):
    """One SQLite store for the module (creating one costs ~1.5 s)."""
    out = tmp_path_factory.mktemp("out")
    return out, tracking.default_tracking_uri(out)


@pytest.mark.parametrize(
    ("raw", "secret", "kept"),
    [
        ("postgresql://alice:s3cr3t@db.example:5432/mlflow", "s3cr3t", "postgresql://alice:***@db.example:5432"),
        ("mysql://root:p@ss@db/x", "p@ss", "mysql://root:***@db/x"),
        ("https://mlflow.example/api?run=1&token=abc123xyz&x=2", "abc123xyz", "token=***&x=2"),
        ("https://h/p?API_KEY=k-999&access_token=zz77", "k-999", "API_KEY=***"),
        ("login with hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123 please", "hf_AbCdEfGhIjKl", "login with *** please"),
        ("Authorization: Bearer eyJhbGciOi.abc-def", "eyJhbGciOi", "Bearer ***"),
    ],
)
def test_mask_secrets(raw, secret, kept):
    masked = redaction.mask_secrets(raw)
    assert secret not in masked
    assert kept in masked


@pytest.mark.parametrize(
    "harmless",
    ["http://localhost:5000/api/2.0", "http://host:8080/a@b", "sqlite:////tmp/x/mlflow.db", "hf_transfer on",
     "max_new_tokens=32", "https://x.example/?design=1"],
)
def test_mask_secrets_leaves_harmless_text_alone(harmless):
    assert redaction.mask_secrets(harmless) == harmless


def test_flatten_config_dots_keys_and_masks_secret_keys():
    tree = {
        "model": {"name_or_path": "meta-llama/Llama-3.2-1B", "hf_token": "hf_AbCdEfGhIjKlMn", "revision": None},
        "eval": {"max_new_tokens": 32},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "mlflow": {"tracking_uri": "https://bob:pw123@mlflow.example", "apiKey": "k", "password": ""},
    }
    flat = tracking.flatten_config(tree)
    assert flat["model.name_or_path"] == "meta-llama/Llama-3.2-1B"
    assert flat["model.hf_token"] == "***"
    assert flat["model.revision"] == "None"
    assert flat["eval.max_new_tokens"] == "32"  # "tokens" is not the word "token"
    assert flat["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert flat["mlflow.tracking_uri"] == "https://bob:***@mlflow.example"
    assert flat["mlflow.apiKey"] == "***"
    assert flat["mlflow.password"] == ""  # nothing to hide, and "empty" is useful to see


def test_default_tracking_uri_is_sqlite_under_output_dir(tmp_path):
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path) == tracking.default_tracking_uri(tmp_path)
    configured = MlflowConfig(tracking_uri="http://mlflow:5000")
    assert tracking.resolve_tracking_uri(configured, tmp_path) == "http://mlflow:5000"


def test_open_local_store_opens_a_sqlite_store_and_leaves_a_tracking_server_alone(tmp_path):
    """`lora-pipeline run` opens the local store while Prefect's server starts: the schema is there after it;
    a tracking server is not contacted (nothing listens on port 9)."""
    import sqlite3

    tracking.open_local_store(tracking.default_tracking_uri(tmp_path / "fresh"))
    with sqlite3.connect(tmp_path / "fresh" / "mlflow.db") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "runs", "registered_models"} <= tables
    tracking.open_local_store("http://127.0.0.1:9")


def test_experiment_artifacts_live_under_the_given_dir(store):
    out, uri = store
    exp_id = tracking.ensure_experiment(uri, "exp-artifacts", out / "mlartifacts")
    assert tracking.ensure_experiment(uri, "exp-artifacts", out / "mlartifacts") == exp_id
    experiment = mlflow.MlflowClient(uri).get_experiment(exp_id)
    assert experiment.artifact_location == (out / "mlartifacts").resolve().as_uri()

    run_id = tracking.start_pipeline_run(uri, "exp-artifacts", out / "mlartifacts", "r", {})
    (out / "report.json").write_text("{}")
    (out / "eval").mkdir()
    (out / "eval" / "base.json").write_text("{}")
    tracking.log_artifacts(uri, run_id, out / "report.json")
    tracking.log_artifacts(uri, run_id, out / "eval", "eval")
    artifact_uri = mlflow.MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith((out / "mlartifacts").resolve().as_uri())
    root = Path(artifact_uri.removeprefix("file://"))
    assert (root / "report.json").is_file() and (root / "eval" / "base.json").is_file()
    with pytest.raises(FileNotFoundError):
        tracking.log_artifacts(uri, run_id, out / "missing")


def test_params_metrics_and_tags_round_trip(store):
    out, uri = store
    run_id = tracking.start_pipeline_run(
        uri, "exp-roundtrip", out / "mlartifacts", "run-1",
        tags={"flow_run_id": "f-1", "source": "https://u:hunter2@git.example/repo.git"},
    )
    params = {f"p{i:03d}": str(i) for i in range(150)}  # more than one MLflow batch (100)
    params["long"] = "x" * 7000  # over MLflow's 6000-char param limit
    tracking.log_params(uri, run_id, params)
    tracking.log_metrics(uri, run_id, {"loss": 1.5, "acc": 0.25}, step=3)
    tracking.log_metrics(uri, run_id, {"loss": 0.5}, step=4)
    tracking.set_tags(uri, run_id, {"gate_passed": "true", "note": "token hf_AbCdEfGhIjKlMnOpQrSt"})
    tracking.end_run(uri, run_id)

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run-1"
    assert run.data.params["p149"] == "149"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    assert run.data.metrics == {"loss": 0.5, "acc": 0.25}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 1.5), (4, 0.5)]
    assert run.data.tags["flow_run_id"] == "f-1" and run.data.tags["gate_passed"] == "true"
    assert "hunter2" not in run.data.tags["source"] and "hf_AbCd" not in run.data.tags["note"]
    with pytest.raises(ValueError, match="FINISHED"):
        tracking.end_run(uri, run_id, "DONE")


def test_no_fluent_active_run_is_left_behind(store):
    out, uri = store
    tracking.start_pipeline_run(uri, "exp-fluent", out / "mlartifacts", "r", {})
    assert mlflow.active_run() is None


def test_fluent_tracking_uri_restores_global_state(store, monkeypatch):
    _, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user-choice:5000")
    with tracking.fluent_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
        assert mlflow.get_registry_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://user-choice:5000"
    assert mlflow.get_tracking_uri() == "http://user-choice:5000"
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_code_version_is_the_git_commit_or_unknown(tmp_path):
    import subprocess

    from lora_pipeline.summary import code_version

    assert code_version(tmp_path) == "unknown"  # not a git checkout
    os.environ["LORA_PIPELINE_GIT_COMMIT"] = "f" * 40  # a container image names its commit
    try:
        assert code_version(tmp_path) == "f" * 40
    finally:
        del os.environ["LORA_PIPELINE_GIT_COMMIT"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("1")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert code_version(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert code_version(tmp_path) == f"{head}+dirty"
