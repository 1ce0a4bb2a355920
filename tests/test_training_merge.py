"""QLoRA training on a tiny model: the 4-bit base stays frozen, the adapter learns, the merge is exact.

A full disk while saving the merged model: tests/reliability/test_full_disk.py.
"""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_pipeline.config_files import load_config
from lora_pipeline.formatting import encode_generation_prompt, format_dataset, prompt_turns
from lora_pipeline.merge import MergeError, merge_adapter, merge_lora
from lora_pipeline.modeling import load_base_model, load_tokenizer
from lora_pipeline.training import build_sft_config, train_qlora
from tests.conftest import chat_rows
from tests.helpers.trainings import trained  # noqa: F401  (fixture)


def test_training_reports_metrics_and_streams_steps(trained):
    _, _, result, logged = trained
    assert result.metrics["global_step"] == 12
    assert 0 < result.metrics["trainable_ratio"] < 1
    assert result.metrics["tokens_per_second"] > 0
    assert [step for step, m in logged if "loss" in m] == [4, 8, 12]


def test_only_adapter_weights_change_and_base_is_4bit(trained, tiny_model_dir):
    cfg, _, result, _ = trained
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    # LoRA B starts at zero: any non-zero B proves the adapter trained.
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    base = load_base_model(cfg.model, cfg.quant, torch.device("cpu"))
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = PeftModel.from_pretrained(base, str(result.adapter_dir), is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The base checkpoint on disk is untouched by training.
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (n, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def _prompts(cfg, adapter_dir, count):
    tokenizer = load_tokenizer(cfg.model, adapter_dir)
    return [encode_generation_prompt(tokenizer, prompt_turns(row["messages"])) for row in chat_rows()[:count]]


def test_merged_model_matches_base_plus_adapter(trained):
    cfg, run_dir, result, _ = trained
    tokenizer = load_tokenizer(cfg.model)
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]  # e.g. EOS + end-of-turn
    report = merge_adapter(cfg, result.adapter_dir, run_dir / "merged", _prompts(cfg, result.adapter_dir, 4), stop_ids)
    assert report.dequantized and report.n_prompts == 4
    assert report.merge_rel_diff <= cfg.merge.parity_tolerance
    assert report.quantized_rel_diff <= cfg.merge.quantized_parity_tolerance
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    assert (Path(run_dir / "merged") / "model.safetensors").is_file()
    assert merged.generation_config.eos_token_id == stop_ids  # the whole stop set, never one id


def test_merge_into_4bit_weights_is_refused(trained):
    cfg, _, result, _ = trained
    quantized = load_base_model(cfg.model, cfg.quant, torch.device("cpu"))
    with pytest.raises(MergeError, match="quantised"):
        merge_lora(PeftModel.from_pretrained(quantized, str(result.adapter_dir)))


def test_parity_failure_writes_nothing(trained, tmp_path):
    cfg, _, result, _ = trained
    strict = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"quantized_parity_tolerance": 1e-9})})
    with pytest.raises(MergeError, match="quantized_parity_tolerance"):
        merge_adapter(strict, result.adapter_dir, tmp_path / "merged", _prompts(cfg, result.adapter_dir, 2), [2])
    assert not (tmp_path / "merged").exists()


def test_loss_curve_and_peak_memory_are_recorded(trained):
    _, run_dir, result, _ = trained
    curve = run_dir / "train" / "loss_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.metrics["peak_memory_mb"] > 0


@pytest.mark.parametrize(("overrides", "adapter_config"), [
    (["lora.use_dora=true"], {"use_dora": True}),
    (["lora.use_rslora=true", "lora.modules_to_save=[lm_head]"], {"use_rslora": True, "modules_to_save": ["lm_head"]}),
    (["train.packing=true"], {}),
    (["train.group_by_length=true"], {}),
])
def test_lora_and_packing_options_reach_the_adapter(tiny_model_dir, tiny_rows_path, tmp_path, overrides, adapter_config):
    import json

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", f"data.path={tiny_rows_path}",
                             "train.max_steps=2",
                             "train.warmup_steps=0", "train.save_steps=2", *overrides])
    tokenized = tmp_path / "tokenized.jsonl"
    format_dataset(load_tokenizer(cfg.model), tiny_rows_path, tokenized, cfg.data.max_length)
    result = train_qlora(cfg, tokenized, tmp_path)
    assert result.metrics["global_step"] == 2
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert {key: saved[key] for key in adapter_config} == adapter_config
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    if "modules_to_save" in adapter_config:
        assert any("lm_head" in name and "lora_" not in name for name in weights)
    if cfg.lora.use_dora:
        assert any("lora_magnitude_vector" in name for name in weights)
    if cfg.train.group_by_length:
        assert build_sft_config(cfg, tmp_path, torch.float32, torch.device("cpu")).train_sampling_strategy == \
            "group_by_length"
    samples = sum(1 for _ in tokenized.open())
    if cfg.train.packing:  # CPU/SDPA: row packing, several samples per training sequence
        assert result.metrics["train_sequences"] < samples
    else:
        assert result.metrics["train_sequences"] == samples
