"""Registering a model: transformers flavor, lineage tags, idempotent per run key, loadable."""

from __future__ import annotations

import mlflow
import pytest

from lora_pipeline import tracking
from lora_pipeline.config import RegistryConfig
from lora_pipeline.loading import load_text_generation
from lora_pipeline.registry import RegisteredVersion, find_version_by_run_key, register_model
from tests.tiny_model import build_tiny_llama

NAME = "tiny-llama"
LINEAGE = {"data_hash": "d41d8cd9", "config_hash": "0123abcd", "base_model": "builtin:demo",
           "flow_run_id": "flow-1", "git_commit": "deadbeef", "task_exact_match": "0.9"}
PROMPT = [{"role": "user", "content": "what is the capital of france?"}]


@pytest.fixture(autouse=True)
def nothing_in_cwd(mlflow_workdir):
    yield
    assert sorted(p.name for p in mlflow_workdir.iterdir()) == []  # no ./mlruns, no ./mlflow.db


@pytest.fixture(scope="module")
def env(mlflow_workdir, tmp_path_factory):
    """A tiny model + adapter dir, a tracking store and one pipeline run (built once: ~3 s)."""
    out = tmp_path_factory.mktemp("out")
    model = build_tiny_llama(out / "merged")
    adapter = out / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    uri = tracking.default_tracking_uri(out)
    run_id = tracking.start_pipeline_run(uri, "exp", out / "mlartifacts", "run", {})
    return {"out": out, "model": model, "adapter": adapter, "uri": uri, "run_id": run_id}


def _register(env, run_key: str, name: str = NAME, tags=LINEAGE) -> RegisteredVersion:
    return register_model(
        tracking_uri=env["uri"], run_id=env["run_id"], model_dir=env["model"].path,
        registry_cfg=RegistryConfig(model_name=name), run_key=run_key, tags=tags,
        input_example=PROMPT, adapter_dir=env["adapter"],
    )


@pytest.fixture(scope="module")
def first(env):
    return _register(env, "key-1")


def test_first_registration_creates_version_1_with_lineage(env, first):
    assert first == RegisteredVersion(NAME, "1", env["run_id"], f"models:/{NAME}/1", created=True)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    version = client.get_model_version(NAME, "1")
    assert version.run_id == env["run_id"]
    assert version.source.startswith("models:/m-")  # the MLflow 3 logged model
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.artifact_location.startswith((env["out"] / "mlartifacts").resolve().as_uri())
    assert logged.source_run_id == env["run_id"] and logged.status == "READY"
    assert version.tags == {**LINEAGE, "run_key": "key-1", "adapter_uri": f"runs:/{env['run_id']}/adapter",
                            "store": "merged"}
    run_tags = client.get_run(env["run_id"]).data.tags
    assert run_tags["data_hash"] == LINEAGE["data_hash"] and run_tags["run_key"] == "key-1"
    assert "adapter/adapter_config.json" in [
        a.path for a in client.list_artifacts(env["run_id"], "adapter")
    ]


def test_flavor_signature_and_requirements(env, first):
    # download_artifacts(tracking_uri=...) still resolves models:/ through the global registry URI.
    with tracking.fluent_tracking_uri(env["uri"]):
        model_dir = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(env["out"] / "dl"))
    info = mlflow.models.Model.load(model_dir)
    flavor = info.flavors["transformers"]
    assert flavor["task"] == "text-generation" and flavor["inference_task"] == "llm/v1/chat"
    assert info.signature.inputs.input_names()[0] == "messages"
    requirements = (env["out"] / "dl" / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") and "+" not in r for r in requirements)
    assert any(r.startswith("transformers==") for r in requirements)


def test_same_run_key_returns_existing_version(env, first):
    again = _register(env, "key-1")
    assert again == RegisteredVersion(NAME, "1", env["run_id"], f"models:/{NAME}/1", created=False)
    assert find_version_by_run_key(env["uri"], NAME, "key-1") == again
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_new_run_key_creates_next_version(env, first):
    second = _register(env, "key-2")
    assert (second.version, second.created) == ("2", True)
    assert find_version_by_run_key(env["uri"], NAME, "key-1").version == "1"
    assert find_version_by_run_key(env["uri"], NAME, "unknown") is None
    assert find_version_by_run_key(env["uri"], "not-registered", "key-1") is None


def test_registered_model_loads_and_generates(env, first):
    (env["out"] / "loaded").mkdir()
    pipe = load_text_generation(first.model_uri, env["uri"], dst_dir=env["out"] / "loaded")
    assert pipe.task == "text-generation"
    eos = env["model"].eos_token_id
    assert eos in pipe.model.generation_config.eos_token_id
    assert pipe.tokenizer.pad_token_id == env["model"].pad_token_id != eos
    prompt_ids = pipe.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)["input_ids"]
    full_ids = pipe(PROMPT, max_new_tokens=6, return_tensors=True)[0]["generated_token_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the chat template was applied
    new_ids = full_ids[len(prompt_ids):]
    assert 1 <= len(new_ids) <= 6 and eos not in new_ids[:-1]  # stops at EOS or the budget
    text = pipe(PROMPT, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    assert isinstance(text, str)


def test_secrets_in_lineage_never_reach_mlflow(env):
    secret_tags = {**LINEAGE, "tracking_uri": "postgresql://ml:pa55word@db:5432/mlflow",
                   "base_model": "https://hf.co/x?token=tok-abc123"}
    version = _register(env, "key-secret", name="tiny-llama-secrets", tags=secret_tags)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    model_version = client.get_model_version(version.name, version.version)
    stored = [
        model_version.tags,
        client.get_run(env["run_id"]).data.tags,
        client.get_logged_model(model_version.source.removeprefix("models:/")).tags,
    ]
    for tags in stored:
        values = " ".join(tags.values())
        assert "pa55word" not in values and "tok-abc123" not in values
    assert stored[0]["tracking_uri"] == "postgresql://ml:***@db:5432/mlflow"


def test_missing_model_dir_is_named(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        register_model(tracking_uri=env["uri"], run_id=env["run_id"], model_dir=tmp_path / "nope",
                       registry_cfg=RegistryConfig(model_name=NAME), run_key="k", tags={}, input_example="hi")


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


def _register_in_processes(env, name: str, run_keys: list[str], barrier) -> list[dict]:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    barrier.mkdir()
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.register_concurrently", env["uri"], env["run_id"],
         str(env["model"].path), name, key, str(barrier), str(len(run_keys))],
        cwd=barrier, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for key in run_keys]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_two_processes_registering_different_runs_get_distinct_correct_versions(env, tmp_path):
    results = _register_in_processes(env, "tiny-llama-parallel", ["run-a", "run-b"], tmp_path / "barrier")
    assert sorted(r["version"] for r in results) == ["1", "2"] and all(r["created"] for r in results)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    for key, result in zip(["run-a", "run-b"], results, strict=True):
        stored = client.get_model_version("tiny-llama-parallel", result["version"])
        assert stored.tags["run_key"] == key and stored.tags["data_hash"] == key


def test_two_processes_registering_one_run_get_one_version(env, tmp_path):
    results = _register_in_processes(env, "tiny-llama-same-run", ["run-x", "run-x"], tmp_path / "barrier")
    assert results[0]["version"] == results[1]["version"]
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    versions = client.search_model_versions("name = 'tiny-llama-same-run'")
    assert [str(v.version) for v in versions if v.tags.get("run_key") == "run-x"] == [results[0]["version"]]


def test_promote_then_rollback_restores_the_previous_champion(env):
    from lora_pipeline import promotion

    name = "tiny-llama-aliases"
    versions = [_register(env, f"alias-{i}", name=name).version for i in range(3)]
    uri = env["uri"]
    assert promotion.version_by_alias(uri, name, "champion") is None
    with pytest.raises(promotion.PromotionError, match="nothing to roll back"):
        promotion.rollback(uri, name)
    assert promotion.promote(uri, name, versions[0]) == {"champion": versions[0], "previous": None}
    assert promotion.promote(uri, name, versions[1]) == {"champion": versions[1], "previous": versions[0]}
    assert promotion.promote(uri, name, versions[1])["previous"] == versions[0]  # again: no change
    promotion.promote(uri, name, versions[2])
    assert promotion.aliases(uri, name) == {"champion": versions[2], "previous": versions[1]}

    assert promotion.rollback(uri, name) == {"champion": versions[1], "previous": versions[0],
                                            "rolled_back": versions[2]}
    assert promotion.aliases(uri, name) == {"champion": versions[1], "previous": versions[0]}
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version(name, versions[2]).tags["rolled_back"] == "true"
    promotion.rollback(uri, name)  # one more step back: the chain ends there
    assert promotion.aliases(uri, name) == {"champion": versions[0]}
    with pytest.raises(promotion.PromotionError):
        promotion.rollback(uri, name)
    with pytest.raises(promotion.PromotionError, match="no version 99"):
        promotion.promote(uri, name, "99")


def test_cli_promote_and_rollback(env, capsys):
    import json

    from lora_pipeline.cli import main

    name = "tiny-llama-cli"
    first, second = (_register(env, f"cli-{i}", name=name).version for i in range(2))
    tracking = [f"--set=mlflow.tracking_uri={env['uri']}"]
    assert main(["promote", name, first, *tracking]) == 0
    assert main(["promote", name, second, *tracking]) == 0
    assert json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")["aliases"] == {
        "champion": second, "previous": first}
    assert main(["rollback", name, *tracking]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == {"champion": first}
    assert main(["rollback", name, *tracking]) == 1
    assert "nothing to roll back" in capsys.readouterr().err


def test_a_version_that_failed_the_gate_is_promoted_only_with_force(env):
    from lora_pipeline import promotion

    name = "tiny-llama-gated"
    version = _register(env, "gated-1", name=name, tags={**LINEAGE, "gate_passed": "False",
                                                        "gate_reasons": "FAIL: regression drop +0.250"}).version
    with pytest.raises(promotion.PromotionError, match="failed the gate .*regression drop"):
        promotion.promote(env["uri"], name, version)
    assert promotion.version_by_alias(env["uri"], name, "champion") is None
    assert promotion.promote(env["uri"], name, version, force=True)["champion"] == version


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
