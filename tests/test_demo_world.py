"""The offline demo world: deterministic, cached by spec hash, a standard HF model dir, decontaminated.

Built here on a tiny spec (seconds); the default spec's quality targets (base model >= 50 % on the
regression Q/A, <= 10 % on the task) are checked by tests/test_demo_run.py through the real demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_pipeline.demo_world import DemoWorldSpec, ensure_demo_world
from lora_pipeline.demo_world.world import COMPLETE_MARKER

TINY = dict(
    n_countries=6, lexicon_size=8, n_train_rows=60, n_eval_rows=12, n_regression_copy_rows=6,
    n_regression_translate_rows=6, n_regression_text_rows=5, fact_repeats=1, n_pretrain_copy_rows=40,
    n_pretrain_translate_rows=40, n_pretrain_prose_rows=20, vocab_size=400, hidden_size=64, num_layers=1,
    num_heads=1, num_kv_heads=1, intermediate_size=128, pretrain_steps=3, pretrain_batch_size=8,
    pretrain_warmup_steps=1,
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompt(row: dict) -> str:
    return row["messages"][0]["content"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_demo_world(DemoWorldSpec(**TINY), tmp_path_factory.mktemp("worlds"), log=lambda _: None)


def test_world_is_cached_by_spec_hash_and_reused(world):
    spec = DemoWorldSpec(**TINY)
    assert world.root.name == spec.spec_hash() and (world.root / COMPLETE_MARKER).is_file()
    lines: list[str] = []
    again = ensure_demo_world(spec, world.root.parent, log=lines.append)
    assert again == world and lines == []  # nothing rebuilt, nothing logged
    assert DemoWorldSpec(**{**TINY, "seed": 1}).spec_hash() != spec.spec_hash()


def test_same_spec_builds_identical_data_and_weights(world, tmp_path):
    other = ensure_demo_world(DemoWorldSpec(**TINY), tmp_path, log=lambda _: None)
    for name in ("train.jsonl", "eval.jsonl", "regression_qa.jsonl", "regression_text.jsonl"):
        assert (other.root / "data" / name).read_bytes() == (world.root / "data" / name).read_bytes(), name
    first = AutoModelForCausalLM.from_pretrained(world.model_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(other.model_dir).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unfinished_build_is_never_trusted(tmp_path):
    spec = DemoWorldSpec(**TINY)
    debris = tmp_path / spec.spec_hash()
    (debris / "model").mkdir(parents=True)  # a crashed build without the COMPLETE marker
    built = ensure_demo_world(spec, tmp_path, log=lambda _: None)
    assert (built.model_dir / "model.safetensors").is_file() and (built.root / COMPLETE_MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_model_dir_loads_like_a_hub_model_with_a_trainable_chat_template(world):
    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.bos_token is not None
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert "{% generation %}" in tokenizer.chat_template
    messages = _rows(world.train_path)[0]["messages"]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1  # the answer's EOS is trained
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip() == (
        messages[-1]["content"])
    # bitsandbytes 4-bit needs every quantised Linear dimension to be a multiple of its block size.
    assert all(dim % 64 == 0 for dim in (model.config.hidden_size, model.config.intermediate_size))


def test_held_out_rows_are_decontaminated(world):
    train, held_out = _rows(world.train_path), _rows(world.eval_path)
    task = [r for r in train if "Zerbic" in _prompt(r)]
    replay = [r for r in train if "Zerbic" not in _prompt(r)]
    assert len(task) == TINY["n_train_rows"] and len(held_out) == TINY["n_eval_rows"]
    assert all("Zerbic" in _prompt(r) for r in held_out)
    fraction = DemoWorldSpec(**TINY).task_replay_fraction
    assert len(replay) == round(len(task) * fraction / (1 - fraction))

    def words(row):  # the English sequence being translated, whatever the phrasing
        return _prompt(row).split(": ", 1)[1]

    assert not {words(r) for r in held_out} & {words(r) for r in task}
    pretrain = _rows(world.root / "data" / "pretrain.jsonl")
    pretrain_dialogues = [r for r in pretrain if "messages" in r]
    assert all(r in pretrain_dialogues for r in replay)  # replay is the base's own skills, nothing new
    seen_prompts = {_prompt(r) for r in pretrain_dialogues}
    regression = _rows(world.regression_qa_path)
    assert regression and not {_prompt(r) for r in regression} & seen_prompts
    assert not any("Zerbic" in p for p in seen_prompts)  # the task skill is absent from pre-training
    seen_text = {r["text"] for r in pretrain if "text" in r}
    assert not {r["text"] for r in _rows(world.regression_text_path)} & seen_text


def test_contradictory_spec_is_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        DemoWorldSpec(hidden_size=96, num_heads=1, num_kv_heads=1)
    with pytest.raises(ValueError, match="min_words"):
        DemoWorldSpec(min_words=5, max_words=2)
