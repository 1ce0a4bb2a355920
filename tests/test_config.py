"""The typed config: every documented key exists, overrides parse, bad input names the key.

Remote code, paths and names that climb out, and the run key: tests/reliability/test_hostile_inputs.py.
"""

from pathlib import Path

import pytest
import yaml

from lora_pipeline.config import ConfigError, PipelineConfig
from lora_pipeline.config_files import load_config, parse_override

REPO = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = [
    "model.name_or_path", "data.path", "data.format", "data.max_length", "lora.r", "lora.alpha",
    "lora.dropout", "lora.target_modules", "quant.load_in_4bit", "train.max_steps",
    "train.learning_rate", "train.num_processes", "train.seed", "eval.max_new_tokens",
    "mlflow.tracking_uri", "registry.model_name", "output_dir",
]


@pytest.mark.parametrize("dotted", REQUIRED_KEYS)
def test_required_key_exists(dotted):
    node = PipelineConfig().model_dump()
    for part in dotted.split("."):
        assert part in node, f"missing config key {dotted}"
        node = node[part]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir.is_absolute()


def test_overrides_are_typed_yaml_values(tmp_path):
    cfg = load_config(None, ["lora.r=8", "lora.target_modules=[q_proj, v_proj]", "quant.load_in_4bit=false",
                             "train.learning_rate=5e-4", f"output_dir={tmp_path}"])
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.quant.load_in_4bit is False
    assert cfg.train.learning_rate == pytest.approx(5e-4)
    assert cfg.output_dir == tmp_path


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lora": {"r": 4}, "train": {"max_steps": 30, "warmup_steps": 0}}))
    cfg = load_config(path, ["lora.r=32"])
    assert (cfg.lora.r, cfg.train.max_steps) == (32, 30)


def test_relative_output_dir_is_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["output_dir=runs"]).output_dir == tmp_path / "runs"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["lora.rank=8"], "lora.rank"),
        (["lora.r=eight"], "lora.r"),
        (["nonsense=1"], "nonsense"),
        (["quant.load_in_8bit=true"], "load_in_8bit"),
        (["train.warmup_steps=500"], "train.warmup_steps"),
        (["lora.target_modules=[]"], "lora.target_modules"),
        (["model.trust_remote_code=true"], "model.revision"),
        (["data.format=csv"], "data.format"),
    ],
)
def test_bad_config_names_the_key(overrides, named):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert named in str(info.value)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("lora.r")


def test_config_hash_tracks_every_setting():
    assert load_config(None).config_hash() == load_config(None).config_hash()
    assert load_config(None).config_hash() != load_config(None, ["train.seed=1"]).config_hash()


def test_run_key_changes_with_the_training_libraries(monkeypatch):
    import lora_pipeline.config as config_module

    reference = load_config(None).run_key("d", "b")
    monkeypatch.setattr(config_module, "_library_versions", lambda: {"torch": "9.9", "trl": "0.1"})
    assert load_config(None).run_key("d", "b") != reference


def test_a_real_model_never_trains_on_the_demo_rows_by_default():
    assert load_config(None).data.path == "builtin:demo"  # the demo model gets the demo's rows
    with pytest.raises(ConfigError, match="data.path is required: model.name_or_path=/my/model is not the demo"):
        load_config(None, ["model.name_or_path=/my/model"])
    assert load_config(None, ["model.name_or_path=/my/model", "data.path=my.jsonl"]).data.path == "my.jsonl"


def test_regression_suites_take_the_short_names_too():
    cfg = load_config(None, ["eval.regression_qa=base_answers", "eval.regression_text=null"])
    assert (cfg.eval.regression_qa_path, cfg.eval.regression_text_path) == ("base_answers", None)
    assert load_config(None).eval.regression_qa_path == "auto"  # the demo's suite for the demo, else base_answers


def test_run_overrides_are_typed_and_refuse_what_names_a_place_or_code():
    from lora_pipeline.run_request import RunOverrides, load_run_config

    rows = "configs/data/contacts.jsonl"  # relative to the worker's directory (the repository root)
    allowed = RunOverrides(train_max_steps=50, train_learning_rate=1e-4, lora_r=4, data_path=rows,
                           registry_model_name="m")
    assert allowed.as_overrides() == [f'data.path="{rows}"', "train.max_steps=50", "train.learning_rate=0.0001",
                                      "lora.r=4", 'registry.model_name="m"']
    cfg = load_run_config("configs/demo.yaml", allowed, environ={})
    assert (cfg.train.max_steps, cfg.lora.r, cfg.data.path, cfg.registry.model_name) == (50, 4, rows, "m")
    with pytest.raises(ValueError, match="a run cannot set model_trust_remote_code: a run form may change only"):
        RunOverrides.model_validate({"model_trust_remote_code": True})
    with pytest.raises(ValueError, match="greater than 0"):
        RunOverrides(train_max_steps=0)
    with pytest.raises(ConfigError, match="a run may only read config files under"):
        load_run_config("/etc/hostname", None, environ={})
    # The worker's environment is trusted: its overrides apply first, then the run's.
    worker = {"LORA_PIPELINE_OVERRIDES": '["train.max_steps=70", "lora.r=2"]'}
    cfg = load_run_config("configs/demo.yaml", RunOverrides(lora_r=8), environ=worker)
    assert (cfg.train.max_steps, cfg.lora.r) == (70, 8)


def test_credentials_never_come_from_a_config_file():
    """A password in mlflow.tracking_uri is refused (without echoing it); secrets.env names blocks, not values."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["mlflow.tracking_uri=https://bob:hunter22@mlflow.example"])
    assert "MLFLOW_TRACKING_PASSWORD" in str(refused.value) and "hunter22" not in str(refused.value)
    assert load_config(None, ["mlflow.tracking_uri=https://mlflow.example:5000/a@b"]).mlflow.tracking_uri
    cfg = load_config(None, ["secrets.env.HF_TOKEN=hf-token", "secrets.env.MLFLOW_TRACKING_PASSWORD=mlflow-pw"])
    assert cfg.secrets.env == {"HF_TOKEN": "hf-token", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw"}
    with pytest.raises(ConfigError, match="not a Prefect block name"):
        load_config(None, ["secrets.env.HF_TOKEN=hf_AbCdEfGhIjKlMnOp"])  # a token pasted in place of a block name
    with pytest.raises(ConfigError, match="not an environment variable name"):
        load_config(None, ["secrets.env.hf-token=hf-token"])
