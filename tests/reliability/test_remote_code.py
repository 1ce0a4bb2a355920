"""A model that ships its own code (``auto_map``) is refused unless the config trusts it, everywhere it is loaded:
training, evaluation and merge (the base), registration (the merged model or the adapter's base), and a
registered version loaded back (evaluation against the champion, serving). The code never runs when refused.

Without the refusal, transformers would quietly load its built-in ``LlamaForCausalLM`` for this model (its
type is a known one): safe, but not the model its author meant, and nobody told.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from lora_pipeline import tracking
from lora_pipeline.config import ModelConfig, QuantConfig, RegistryConfig
from lora_pipeline.loading import load_text_generation
from lora_pipeline.modeling import RemoteCodeRefused, load_base_model
from lora_pipeline.registry import register_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FULL_PRECISION = QuantConfig(load_in_4bit=False)


def _plant_code(model_dir: Path, marker: Path) -> None:
    """Give ``model_dir`` an ``auto_map`` to a module whose import writes ``marker``."""
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    pass\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")


@pytest.fixture
def custom_code_model(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "custom-code-ran"
    _plant_code(model_dir, marker)
    return model_dir, marker


def test_the_base_is_refused_for_training_evaluation_and_merge_unless_trusted(custom_code_model):
    model_dir, marker = custom_code_model
    with pytest.raises(RemoteCodeRefused, match="model.trust_remote_code=true and model.revision"):
        load_base_model(ModelConfig(name_or_path=str(model_dir)), FULL_PRECISION, torch.device("cpu"), quantize=False)
    assert not marker.exists()
    # Trusted at a full commit (the config refuses trust without one), the model's own code is what loads.
    trusted = ModelConfig(name_or_path=str(model_dir), trust_remote_code=True, revision=COMMIT)
    model = load_base_model(trusted, FULL_PRECISION, torch.device("cpu"), quantize=False)
    assert type(model).__name__ == "CustomModel" and marker.read_text() == "ran"


def test_registration_and_a_registered_version_loaded_back_refuse_it_too(custom_code_model, tiny_model_dir,
                                                                          mlflow_workdir, tmp_path):
    model_dir, marker = custom_code_model
    uri = tracking.default_tracking_uri(tmp_path)
    run_id = tracking.start_pipeline_run(uri, "exp", tmp_path / "mlartifacts", "run", {})

    def register(source: Path, name: str):
        return register_model(tracking_uri=uri, run_id=run_id, model_dir=source, registry_cfg=RegistryConfig(
            model_name=name), run_key=name, tags={}, input_example="hi")

    with pytest.raises(RemoteCodeRefused):
        register(model_dir, "custom-code")
    assert not marker.exists()
    assert mlflow.MlflowClient(uri, registry_uri=uri).search_model_versions("name = 'custom-code'") == []

    # A version registered clean, whose stored config someone with write access to the artifact store
    # later points at code of their own: loading it back refuses before MLflow loads anything.
    version = register(tiny_model_dir, "tampered")
    (stored_config,) = [p for p in (tmp_path / "mlartifacts").rglob("model/config.json")]
    _plant_code(stored_config.parent, marker)
    with pytest.raises(RemoteCodeRefused):
        load_text_generation(version.model_uri, uri, dst_dir=tmp_path / "download")
    assert not marker.exists()
