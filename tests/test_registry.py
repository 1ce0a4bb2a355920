"""Registering a model: transformers flavor, lineage tags, idempotent per run key, loadable.

The faults (a lost response, races, concurrent processes): tests/reliability/test_registration_faults.py.
"""

from __future__ import annotations

import mlflow
import pytest

from lora_pipeline import tracking
from lora_pipeline.config import RegistryConfig
from lora_pipeline.loading import load_text_generation
from lora_pipeline.registry import RegisteredVersion, find_version_by_run_key, register_model
from tests.helpers.registry import LINEAGE, NAME, PROMPT, env, first, nothing_in_cwd  # noqa: F401  (fixtures)
from tests.helpers.registry import register as _register
from tests.helpers.registry import register_in_processes as _register_in_processes


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


def test_two_processes_registering_different_runs_get_distinct_correct_versions(env, tmp_path):
    results = _register_in_processes(env, "tiny-llama-parallel", ["run-a", "run-b"], tmp_path / "barrier")
    assert sorted(r["version"] for r in results) == ["1", "2"] and all(r["created"] for r in results)
    client = mlflow.MlflowClient(env["uri"], registry_uri=env["uri"])
    for key, result in zip(["run-a", "run-b"], results, strict=True):
        stored = client.get_model_version("tiny-llama-parallel", result["version"])
        assert stored.tags["run_key"] == key and stored.tags["data_hash"] == key


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
