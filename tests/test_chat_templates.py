"""Named chat templates and pad handling: one BOS, every answer ends in a trained EOS, padding never hides it."""

import logging
import typing
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lora_pipeline.chat_templates import CHAT_TEMPLATES, apply_named_template, get_chat_template
from lora_pipeline.config import ConfigError, ModelConfig
from lora_pipeline.config_files import load_config
from lora_pipeline.formatting import (
    IGNORE_INDEX,
    encode_generation_prompt,
    prompt_turns,
    render_generation_prompt,
    tokenize_conversation,
)
from lora_pipeline.modeling import load_tokenizer
from tests.tiny_model import build_tiny_tokenizer

SYSTEM = {"role": "system", "content": "answer with one word."}
TURNS = [
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris"},
    {"role": "user", "content": "add two and three."},
    {"role": "assistant", "content": "five"},
    {"role": "user", "content": "translate hello to french."},
    {"role": "assistant", "content": "bonjour"},
]
CONVERSATIONS = {
    "two-turn": TURNS[:2],
    "multi-turn": TURNS,
    "system-two-turn": [SYSTEM, *TURNS[:2]],
    "system-multi-turn": [SYSTEM, *TURNS],
}
ASSISTANT_HEADERS = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "### Response:\n",
}


def _trained_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive unmasked labels (one per assistant turn when masking is right)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def _save_tokenizer(path: Path, *, pad: bool = True, unk: bool = True) -> Path:
    tokenizer = build_tiny_tokenizer()
    if not pad:
        tokenizer.pad_token = None
    if not unk:
        tokenizer.unk_token = None
    tokenizer.save_pretrained(path)
    return path


def test_config_choices_match_the_named_templates():
    annotation = ModelConfig.model_fields["chat_template"].annotation
    assert set(typing.get_args(annotation)) == {"tokenizer", *CHAT_TEMPLATES}
    assert ModelConfig().chat_template == "tokenizer"


def test_unknown_template_in_config_names_the_key():
    with pytest.raises(ConfigError, match="model.chat_template"):
        load_config(None, ["model.chat_template=vicuna"])


def test_unknown_template_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown chat template 'vicuna': choose one of alpaca, chatml, llama3"):
        apply_named_template(build_tiny_tokenizer(), "vicuna")
    with pytest.raises(ValueError, match="choose one of"):
        get_chat_template("tokenizer")  # the config's "keep it" value is not a template


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_only_answers_and_their_eos_are_trained(name, conversation):
    tokenizer = apply_named_template(build_tiny_tokenizer(), name)
    messages = CONVERSATIONS[conversation]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # tokenize_conversation itself refuses a sample without exactly one leading BOS or with an
    # assistant turn lacking a trained EOS; the asserts below restate those rules independently.
    sample = tokenize_conversation(tokenizer, messages, max_length=512)

    assert sample.input_ids[0] == tokenizer.bos_token_id
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1
    runs = _trained_runs(sample.labels)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers, strict=True):
        assert run[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(run) == answer + tokenizer.eos_token  # nothing but the answer and its EOS
    # Everything else (BOS, system, user turns, headers, separators) is masked.
    assert sum(len(run) for run in runs) == sample.n_trainable
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(sample.input_ids, sample.labels, strict=True))


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_generation_prompt_is_the_trained_context(name, conversation):
    tokenizer = apply_named_template(build_tiny_tokenizer(), name)
    messages = CONVERSATIONS[conversation]
    prompt = render_generation_prompt(tokenizer, prompt_turns(messages))
    assert prompt.endswith(ASSISTANT_HEADERS[name])
    assert prompt.count(tokenizer.bos_token) == 1
    # Serving sees exactly the tokens training saw before the final answer (no train/serve skew).
    prompt_ids = encode_generation_prompt(tokenizer, prompt_turns(messages))
    full_ids = tokenize_conversation(tokenizer, messages, max_length=512).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_no_bos_when_the_tokenizer_has_none(name):
    tokenizer = apply_named_template(build_tiny_tokenizer(), name)
    tokenizer.bos_token = None
    text = tokenizer.apply_chat_template(CONVERSATIONS["system-two-turn"], tokenize=False)
    assert not text.startswith("<s>") and "None" not in text
    sample = tokenize_conversation(tokenizer, CONVERSATIONS["system-two-turn"], max_length=512)
    assert tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX]) == "paris</s>"


def test_chatml_with_im_end_as_eos_trains_only_the_assistant_eos():
    # ChatML instruct tokenizers (e.g. Qwen) use <|im_end|> as EOS: then user turns end in EOS too, masked.
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})  # test fixture only; the pipeline never adds tokens
    apply_named_template(tokenizer, "chatml")
    messages = CONVERSATIONS["system-multi-turn"]
    sample = tokenize_conversation(tokenizer, messages, max_length=512)
    assert sample.input_ids.count(tokenizer.eos_token_id) == len(messages)  # every turn ends in <|im_end|>
    assert sample.labels.count(tokenizer.eos_token_id) == len(_trained_runs(sample.labels)) == 3


def test_alpaca_refuses_an_unknown_role():
    tokenizer = apply_named_template(build_tiny_tokenizer(), "alpaca")
    with pytest.raises(jinja2.TemplateError, match="unsupported role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_missing_pad_without_unk_falls_back_to_eos_with_a_warning(tmp_path, caplog):
    path = _save_tokenizer(tmp_path, pad=False, unk=False)
    size = len(AutoTokenizer.from_pretrained(path))
    with caplog.at_level(logging.WARNING, logger="lora_pipeline.modeling"):
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == size  # no token added: embeddings of a 4-bit base must not resize
    assert "-100 by position" in caplog.text and "distinct pad token" in caplog.text


def test_missing_pad_prefers_unk(tmp_path):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(_save_tokenizer(tmp_path, pad=False))))
    assert tokenizer.pad_token == tokenizer.unk_token == "<unk>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_existing_pad_is_kept(tmp_path):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(_save_tokenizer(tmp_path))))
    assert tokenizer.pad_token == "<pad>"


def test_eos_stays_trained_when_pad_is_eos_through_trl_collator(tmp_path):
    # The acceptance test: pad == EOS, batched by TRL's own collator. Padding is -100 by position;
    # the real EOS of every answer keeps its label even though its id equals the pad id.
    path = _save_tokenizer(tmp_path, pad=False, unk=False)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path), chat_template="chatml"))
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    conversations = [CONVERSATIONS["two-turn"], CONVERSATIONS["system-multi-turn"]]
    samples = [tokenize_conversation(tokenizer, messages, max_length=512) for messages in conversations]
    assert len(samples[0].input_ids) != len(samples[1].input_ids)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])

    for row, (messages, sample) in enumerate(zip(conversations, samples, strict=True)):
        length = len(sample.input_ids)
        input_ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert input_ids[:length] == sample.input_ids and labels[:length] == sample.labels
        assert all(tok == eos for tok in input_ids[length:])  # padded with the EOS id ...
        assert all(label == IGNORE_INDEX for label in labels[length:])  # ... but never trained as padding
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (len(input_ids) - length)
        real_labels = [label for label in labels[:length] if label != IGNORE_INDEX]
        assert real_labels[-1] == eos  # the last answer still ends in a trained EOS
        assert labels.count(eos) == sum(m["role"] == "assistant" for m in messages)  # one trained EOS per answer
    # What a collator masking *by pad id* would have done: every trained EOS lost.
    by_pad_id = batch["labels"].masked_fill(batch["input_ids"] == tokenizer.pad_token_id, IGNORE_INDEX)
    assert (by_pad_id == eos).sum() == 0 < (batch["labels"] == eos).sum()


def test_load_tokenizer_installs_the_named_template_and_saving_keeps_it(tmp_path):
    base = _save_tokenizer(tmp_path / "base")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(base), chat_template="chatml"))
    assert tokenizer.chat_template == CHAT_TEMPLATES["chatml"]
    assert tokenizer.padding_side == "left"
    saved = tmp_path / "adapter"
    tokenizer.save_pretrained(saved)  # what training and merge do

    assert AutoTokenizer.from_pretrained(saved).chat_template == CHAT_TEMPLATES["chatml"]
    # A source dir keeps its saved template even if the config now names another one.
    reloaded = load_tokenizer(ModelConfig(name_or_path=str(base), chat_template="llama3"), saved)
    assert reloaded.chat_template == CHAT_TEMPLATES["chatml"]
    messages = CONVERSATIONS["multi-turn"]
    assert render_generation_prompt(reloaded, messages[:-1]) == render_generation_prompt(tokenizer, messages[:-1])


def test_tokenizer_choice_keeps_the_tokenizers_own_template(tmp_path):
    base = _save_tokenizer(tmp_path)
    own = AutoTokenizer.from_pretrained(base).chat_template
    assert load_tokenizer(ModelConfig(name_or_path=str(base))).chat_template == own


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_prefix_derived_mask_equals_the_generation_markers(name, conversation):
    # Two independent derivations agree where both apply: the formatter renders each answer's
    # generation prompt; transformers reads the template's {% generation %} markers.
    tokenizer = apply_named_template(build_tiny_tokenizer(), name)
    messages = CONVERSATIONS[conversation]
    marked = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    sample = tokenize_conversation(tokenizer, messages, max_length=512)
    assert sample.input_ids == list(marked["input_ids"])
    assert [label != IGNORE_INDEX for label in sample.labels] == [bool(m) for m in marked["assistant_masks"]]
