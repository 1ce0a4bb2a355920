"""A real instruct model, end to end: SmolLM2-135M-Instruct from its GGUF file, on its own chat template.

The model a new user would try first: a ChatML template with a default system prompt, no
``{% generation %}`` markers, BOS = ``<|im_start|>`` opening every turn, pad = EOS = ``<|im_end|>``.
The pipeline runs `configs/smollm2.yaml` (a user's alpaca file) for a few QLoRA steps through every
stage; the registered model loads with plain MLflow and `lora-pipeline serve` answers and stops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline.base_model import COMPLETE_MARKER, base_fingerprint, file_sha256
from lora_pipeline.formatting import IGNORE_INDEX, check_tokenizer, encode_generation_prompt, tokenize_conversation

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2.yaml"
IM_END = 2  # <|im_end|>: EOS, pad and the template's end of turn


def test_gguf_is_converted_once_into_a_plain_model_directory_keyed_by_its_hash(smollm2_gguf, smollm2_dir):
    from transformers import AutoConfig

    from lora_pipeline.config_files import load_config
    from lora_pipeline.stages import resolve_assets

    digest = file_sha256(smollm2_gguf)
    assert smollm2_dir.name.endswith(digest[:16]) and (smollm2_dir / COMPLETE_MARKER).is_file()
    assert not hasattr(AutoConfig.from_pretrained(smollm2_dir), "quantization_config")
    assert base_fingerprint(str(smollm2_dir), None) == base_fingerprint(str(smollm2_gguf), None) == f"gguf-sha256:{digest}"
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    cfg = load_config(None, [f"model.name_or_path={smollm2_gguf}", f"output_dir={smollm2_dir.parents[2]}",
                             "data.path=unused.jsonl"])
    assert Path(resolve_assets(cfg).config.model.name_or_path) == smollm2_dir
    assert weights.stat().st_mtime_ns == before  # cached, not converted again


def test_the_converted_model_answers_and_stops_at_im_end(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    prompt = encode_generation_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    new_tokens = output[0, len(prompt):].tolist()
    assert IM_END in new_tokens
    assert "Paris" in tokenizer.decode(new_tokens[: new_tokens.index(IM_END)])


def test_its_own_template_trains_each_answer_through_im_end_and_nothing_else(smollm2_dir):
    from lora_pipeline.base_model import model_stop_ids
    from lora_pipeline.config import ModelConfig
    from lora_pipeline.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(smollm2_dir)))
    stops = model_stop_ids(smollm2_dir, None, tokenizer)
    assert stops == [IM_END] and tokenizer.bos_token == "<|im_start|>" and tokenizer.pad_token_id == IM_END
    check_tokenizer(tokenizer, stops)  # three BOS per conversation are the template's own: accepted
    messages = [{"role": "user", "content": "Meet Ana, 34, from Lisbon."},
                {"role": "assistant", "content": '{"name": "Ana", "age": 34, "city": "Lisbon"}'},
                {"role": "user", "content": "And Ben, 40, from Oslo?"},
                {"role": "assistant", "content": '{"name": "Ben", "age": 40, "city": "Oslo"}'}]
    sample = tokenize_conversation(tokenizer, messages, 512, stops)
    trained = [label for label in sample.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == messages[1]["content"] + "<|im_end|>" + messages[3]["content"] + "<|im_end|>"
    assert sample.trained_stops == 2
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(sample.input_ids)  # default system prompt
    prompt = encode_generation_prompt(tokenizer, messages[:3])
    assert sample.input_ids[: len(prompt)] == prompt  # the second answer's context is the inference prompt


@pytest.fixture(scope="module")
def pipeline_run(smollm2_dir, tmp_path_factory):
    """`lora-pipeline run --config configs/smollm2.yaml`, a few steps, a gate open wide so every stage runs."""
    root = tmp_path_factory.mktemp("smollm2")
    summary_path = root / "summary.json"
    command = [sys.executable, "-m", "lora_pipeline.cli", "run", "--config", str(CONFIG),
               "--set", f"model.name_or_path={smollm2_dir}", "--set", f"output_dir={root / 'outputs'}",
               "--set", f"data.path={REPO / 'configs' / 'data' / 'contacts.jsonl'}",
               "--set", "train.max_steps=3", "--set", "train.warmup_steps=1", "--set", "train.per_device_batch_size=4",
               "--set", "train.save_steps=3", "--set", "train.logging_steps=1",
               "--set", "eval.max_samples=6", "--set", "eval.batch_size=6", "--set", "merge.parity_samples=2",
               # A few steps teach little: the gate is opened so that merge, register and serve run too.
               "--set", "gate.min_task_gain=-1", "--set", "gate.max_regression=1", "--set", "gate.min_stop_rate=0",
               "--set", "registry.auto_promote=true", "--summary-json", str(summary_path)]
    proc = subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return root, json.loads(summary_path.read_text())


def test_every_stage_runs_on_the_real_model(pipeline_run):
    root, summary = pipeline_run
    assert summary["status"] == "completed"
    assert [s["name"] for s in summary["stages"] if s["status"] == "completed"] == [
        "resolve_assets", "validate_data", "format_prompts", "train_qlora", "evaluate", "gate", "merge", "register",
        "apply_aliases"]
    data = summary["data"]
    assert data["n_quarantined"] == 0 and data["n_held_out"] > 0 and data["n_clean"] + data["n_held_out"] == 400
    run_dir = Path(summary["run_dir"])
    formatted = json.loads((run_dir / "formatted" / "format_report.json").read_text())
    assert formatted["stop_token_ids"] == [IM_END]
    assert formatted["eos_unmasked_turns"] == formatted["n_written"] == data["n_clean"]  # every answer's stop trained
    assert summary["train"]["global_step"] == 3


def test_evaluation_is_fair_and_says_what_it_measured(pipeline_run):
    _, summary = pipeline_run
    evaluations = summary["eval"]
    assert set(evaluations) == {"base", "base_full_precision", "candidate"}
    assert evaluations["base"]["regression_exact_match"] == 1.0  # the references are the base's own answers
    assert evaluations["base"]["regression_stop_rate"] == 1.0
    assert "drifted from the base" in summary["eval_suites"]["regression_qa"]
    assert "held-out split" in summary["eval_suites"]["task"]
    assert json.loads((Path(summary["run_dir"]) / "eval" / "suites.json").read_text()) == summary["eval_suites"]
    assert "task_exact_match" in summary["comparison"]["quantization_cost"]
    references = Path(summary["run_dir"]) / "eval" / "regression_references.jsonl"
    assert len(references.read_text().splitlines()) == 6


def test_registered_model_loads_with_plain_mlflow_and_stops_on_the_whole_stop_set(pipeline_run):
    import mlflow
    import mlflow.transformers

    root, summary = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    try:
        pipe = mlflow.transformers.load_model(summary["registered_model"]["model_uri"], dst_path=str(root))
    finally:
        mlflow.set_tracking_uri(None)
    assert pipe.model.generation_config.eos_token_id == [IM_END]  # a list: the whole stop set
    reply = pipe([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_serve_answers_a_chat_request_that_stops_at_im_end(pipeline_run):
    from tests.helpers.serving import http, served

    root, summary = pipeline_run
    with served("smollm2-contacts@champion", root, "--config", str(CONFIG),
                "--set", f"output_dir={root / 'outputs'}") as (url, health):
        assert health["version"] == summary["registered_model"]["version"]
        reply = http("POST", f"{url}/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 48})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"]
    assert "<|im_end|>" not in choice["message"]["content"]
