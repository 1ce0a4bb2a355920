"""Registry storage forms: the adapter form (LoRA adapter + a reference to a local base), the stop set
carried by both forms, and one loader (and the server) for either."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_pipeline import tracking
from lora_pipeline.config import RegistryConfig
from lora_pipeline.merge import relative_diff
from lora_pipeline.loading import load_registered_model
from lora_pipeline.base_model import resolve_base_dir
from lora_pipeline.registry import RegisteredVersion, find_version_by_run_key, register_model
from lora_pipeline.serving import AliasFollower, build_app
from tests.tiny_model import build_tiny_llama

NAME = "tiny-adapter"
LINEAGE = {"data_hash": "d41d8cd9", "config_hash": "0123abcd", "flow_run_id": "flow-1"}
PROMPT = [{"role": "user", "content": "what is the capital of france?"}]
#: Logits of the registered model against base + adapter loaded directly (float32, same ops).
LOGIT_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def nothing_in_cwd(mlflow_workdir):
    yield
    assert sorted(p.name for p in mlflow_workdir.iterdir()) == []  # no ./mlruns, no ./mlflow.db


@torch.no_grad()
def _logits(model, prompt_ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([prompt_ids])).logits[0].float()


@pytest.fixture(scope="module")
def world(mlflow_workdir, tmp_path_factory):
    """A tiny base dir, a non-trivial LoRA adapter (with tokenizer) on it, a tracking store and a run.

    The stop set has two ids: the tokenizer's EOS and the token base + adapter answers first, so a
    generation that honours the whole set stops right away and one that knows only EOS does not.
    """
    out = tmp_path_factory.mktemp("out")
    base = build_tiny_llama(out / "base")
    torch.manual_seed(1)
    # init_lora_weights=False: a zero-initialised B would make base + adapter equal the base.
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base.path),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenizer.save_pretrained(out / "adapter")
    prompt_ids = list(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)["input_ids"])
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path), out / "adapter").eval()
    reference = _logits(direct, prompt_ids)
    with direct.disable_adapter():
        assert relative_diff(reference, _logits(direct, prompt_ids)) > 1e-3  # the adapter matters
    first_token = int(reference[-1].argmax())
    assert first_token != base.eos_token_id
    uri = tracking.default_tracking_uri(out)
    run_id = tracking.start_pipeline_run(uri, "exp", out / "mlartifacts", "run", {})
    return {"out": out, "base": base, "adapter": out / "adapter", "uri": uri, "run_id": run_id,
            "prompt_ids": prompt_ids, "reference": reference, "eos": [base.eos_token_id, first_token]}


def _register_adapter(world, run_key: str, name: str = NAME, base_model: str | None = None) -> RegisteredVersion:
    return register_model(
        tracking_uri=world["uri"], run_id=world["run_id"], registry_cfg=RegistryConfig(model_name=name),
        run_key=run_key, tags=LINEAGE, input_example=PROMPT, store="adapter", adapter_dir=world["adapter"],
        base_model=base_model or str(world["base"].path), eos_token_ids=world["eos"],
    )


@pytest.fixture(scope="module")
def adapter_version(world) -> RegisteredVersion:
    return _register_adapter(world, "adapter-1")


def _client(world) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(world["uri"], registry_uri=world["uri"])


def test_adapter_version_is_tagged_and_stores_only_the_adapter(world, adapter_version):
    assert (adapter_version.version, adapter_version.created) == ("1", True)
    version = _client(world).get_model_version(NAME, "1")
    base_dir = str(world["base"].path.resolve())
    assert version.tags == {**LINEAGE, "run_key": "adapter-1", "store": "adapter", "base_model_path": base_dir,
                            "base_model": str(world["base"].path),
                            "adapter_uri": f"runs:/{world['run_id']}/adapter"}
    logged = _client(world).get_logged_model(version.source.removeprefix("models:/"))
    root = Path(unquote(urlparse(logged.artifact_location).path))
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    assert [f for f in sizes if f.endswith((".safetensors", ".bin"))] == ["peft/adapter_model.safetensors"]
    base_weights = sum(p.stat().st_size for p in world["base"].path.glob("*.safetensors"))
    assert sum(sizes.values()) < base_weights / 4, sizes  # tokenizer + adapter + metadata only
    info = mlflow.models.Model.load(str(root))
    flavor = info.flavors["transformers"]
    assert flavor["local_base_model_path"] == base_dir and flavor["peft_adaptor"] == "peft"
    assert info.metadata["generation_config"]["eos_token_id"] == world["eos"]
    assert "peft==" in (root / "requirements.txt").read_text()


def test_plain_mlflow_load_gives_base_plus_adapter(world, adapter_version):
    with tracking.fluent_tracking_uri(world["uri"]):
        pipe = mlflow.transformers.load_model(adapter_version.model_uri)
    assert isinstance(pipe.model, PeftModel)
    assert relative_diff(_logits(pipe.model, world["prompt_ids"]), world["reference"]) <= LOGIT_TOLERANCE


def test_loader_restores_the_whole_stop_set_with_or_without_merging(world, adapter_version):
    loaded = load_registered_model(adapter_version.model_uri, world["uri"])
    assert loaded.store == "adapter" and isinstance(loaded.model, PeftModel)
    assert loaded.model.generation_config.eos_token_id == world["eos"]
    merged = load_registered_model(adapter_version.model_uri, world["uri"], merge_adapter=True)
    assert merged.store == "adapter" and not any(isinstance(m, LoraLayer) for m in merged.model.modules())
    assert merged.model.generation_config.eos_token_id == world["eos"]
    for model in (loaded.model, merged.model):
        assert relative_diff(_logits(model, world["prompt_ids"]), world["reference"]) <= LOGIT_TOLERANCE


def test_server_answers_from_the_adapter_version_and_stops_at_every_eos(world, adapter_version):
    _client(world).set_registered_model_alias(NAME, "champion", adapter_version.version)
    source = AliasFollower(world["uri"], f"{NAME}@champion")
    assert source.current().info == {"name": NAME, "alias": "champion", "version": adapter_version.version}
    assert source.current().generator.eos_ids == set(world["eos"])
    reply = TestClient(build_app(source, f"{NAME}@champion")).post(
        "/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 4}).json()
    # The first answer token is the second stop id: a server knowing only EOS would go on.
    assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == 1


def test_mlflow_pyfunc_serving_stops_at_every_eos(world, adapter_version):
    with tracking.fluent_tracking_uri(world["uri"]):
        model = mlflow.pyfunc.load_model(adapter_version.model_uri)
    reply = model.predict({"messages": PROMPT, "max_tokens": 4})[0]
    assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == 1


def test_same_run_key_returns_the_adapter_version(world, adapter_version):
    again = _register_adapter(world, "adapter-1")
    assert again == RegisteredVersion(NAME, "1", world["run_id"], f"models:/{NAME}/1", created=False)
    assert find_version_by_run_key(world["uri"], NAME, "adapter-1") == again
    assert [v.tags["run_key"] for v in _client(world).search_model_versions(f"name = '{NAME}'")].count(
        "adapter-1") == 1


def test_merged_form_carries_the_same_two_id_stop_set(world):
    version = register_model(
        tracking_uri=world["uri"], run_id=world["run_id"], registry_cfg=RegistryConfig(model_name="tiny-merged-eos"),
        run_key="merged-1", tags=LINEAGE, input_example=PROMPT, model_dir=world["base"].path,
        eos_token_ids=world["eos"],
    )
    assert _client(world).get_model_version(version.name, version.version).tags["store"] == "merged"
    loaded = load_registered_model(version.model_uri, world["uri"])
    assert loaded.store == "merged" and loaded.model.generation_config.eos_token_id == world["eos"]
    with tracking.fluent_tracking_uri(world["uri"]):  # the merged dir's generation_config.json carries it
        assert mlflow.transformers.load_model(version.model_uri).model.generation_config.eos_token_id == world["eos"]


def test_a_moved_base_is_named_and_can_be_passed(world, tmp_path):
    moved = tmp_path / "base-copy"
    shutil.copytree(world["base"].path, moved)
    version = _register_adapter(world, "moved-1", name="tiny-adapter-moved", base_model=str(moved))
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="base model at .*base-copy.*base_model_path"):
        load_registered_model(version.model_uri, world["uri"])
    loaded = load_registered_model(version.model_uri, world["uri"], base_model_path=world["base"].path)
    assert relative_diff(_logits(loaded.model, world["prompt_ids"]), world["reference"]) <= LOGIT_TOLERANCE


def test_each_form_refuses_missing_inputs(world, tmp_path):
    common = {"tracking_uri": world["uri"], "run_id": world["run_id"], "registry_cfg": RegistryConfig(model_name=NAME),
              "run_key": "never", "tags": {}, "input_example": "hi"}
    with pytest.raises(ValueError, match="needs model_dir"):
        register_model(**common)
    with pytest.raises(ValueError, match="needs adapter_dir and base_model"):
        register_model(**common, store="adapter", adapter_dir=world["adapter"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        register_model(**common, store="adapter", adapter_dir=tmp_path, base_model=str(world["base"].path))
    with pytest.raises(FileNotFoundError, match="neither a local directory nor in the local Hugging Face cache"):
        register_model(**common, store="adapter", adapter_dir=world["adapter"], base_model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="store must be one of"):
        register_model(**common, store="full", model_dir=world["base"].path)
    with pytest.raises(ValueError, match="eos_token_ids"):
        register_model(**common, model_dir=world["base"].path, eos_token_ids=[])
    assert find_version_by_run_key(world["uri"], NAME, "never") is None


def test_hub_id_base_resolves_to_its_cached_snapshot_offline(world, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-base"
    shutil.copytree(world["base"].path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = (repo / "snapshots" / commit).resolve()
    assert resolve_base_dir("acme/tiny-base") == snapshot
    assert resolve_base_dir("acme/tiny-base", revision=commit) == snapshot
    with pytest.raises(FileNotFoundError, match="revision v2"):
        resolve_base_dir("acme/tiny-base", revision="v2")
    with pytest.raises(FileNotFoundError, match="acme/other"):
        resolve_base_dir("acme/other")
