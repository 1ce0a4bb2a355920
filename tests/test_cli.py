"""The CLI refuses bad configs and missing inputs before any work starts, naming the key or path."""

import pytest

from lora_pipeline.cli import main


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "lora.rank=4"], "lora.rank"),
        (["--set", "train.max_steps=many"], "train.max_steps"),
        (["--set", "quant.load_in_8bit=true"], "load_in_8bit"),
        (["--set", "train.warmup_steps=1000"], "train.warmup_steps"),
    ],
)
def test_bad_config_exits_non_zero_naming_the_key(args, named, capsys):
    assert main(["run", *args]) == 2
    assert named in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_missing_data_file_is_named(tmp_path, capsys):
    missing = tmp_path / "train.jsonl"
    assert main(["run", "--set", f"data.path={missing}", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and str(missing) in err


def test_show_config_prints_validated_values(capsys):
    assert main(["show-config", "--set", "lora.r=4"]) == 0
    assert "r: 4" in capsys.readouterr().out
