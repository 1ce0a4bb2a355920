"""The one formatter: masks counted, not assumed; every assistant turn ends in a trained EOS."""

import json

import pytest
from transformers import AutoTokenizer

from lora_pipeline.formatting import (
    IGNORE_INDEX,
    FormatError,
    RowFormatError,
    check_tokenizer,
    encode_generation_prompt,
    format_dataset,
    render_generation_prompt,
    tokenize_conversation,
)

CONVERSATION = [
    {"role": "user", "content": "repeat red cat"},
    {"role": "assistant", "content": "red cat"},
    {"role": "user", "content": "repeat blue owl"},
    {"role": "assistant", "content": "blue owl"},
]


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _trained_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_labels_cover_exactly_the_answers_and_their_eos(tokenizer):
    sample = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    assert sample.input_ids[0] == tokenizer.bos_token_id
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1
    assert _trained_text(tokenizer, sample) == "red cat</s>blue owl</s>"
    assert sample.labels.count(tokenizer.eos_token_id) == 2
    assert not sample.truncated


def test_eos_stays_trained_when_pad_equals_eos(tokenizer):
    # Llama-style tokenizers often pad with EOS; a collator that masks pad ids would then never
    # train EOS. Labels are computed here from the template, not from pad ids.
    tokenizer.pad_token = tokenizer.eos_token
    sample = tokenize_conversation(tokenizer, CONVERSATION[:2], max_length=512)
    assert sample.labels[-1] == tokenizer.eos_token_id
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_format_report_flags_pad_equal_to_eos_and_still_trains_every_eos(tokenizer, tiny_rows_path, tmp_path):
    tokenizer.pad_token = tokenizer.eos_token
    out = tmp_path / "tokenized.jsonl"
    report = format_dataset(tokenizer, tiny_rows_path, out, max_length=512)
    assert report.pad_is_eos is True and report.eos_unmasked_turns == report.n_written == 64
    assert all(json.loads(line)["labels"][-1] == tokenizer.eos_token_id for line in out.read_text().splitlines())


def test_truncation_is_counted(tokenizer):
    full = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=len(full.input_ids) - 3)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 3


def test_template_without_generation_markers_trains_the_same_tokens(tokenizer):
    # The mask comes from rendering each answer's generation prompt, not from {% generation %} markers:
    # removing the markers changes nothing that is trained.
    marked = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    plain = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    assert plain == marked
    assert _trained_text(tokenizer, plain) == "red cat</s>blue owl</s>"


def test_template_that_drops_eos_is_refused(tokenizer):
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ eos_token }}", "")
    with pytest.raises(RowFormatError, match="answer_ends_in_stop_token"):
        tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    with pytest.raises(FormatError, match="^answer_ends_in_stop_token: .* probe conversation"):
        check_tokenizer(tokenizer)


def test_tokenizer_without_pad_is_refused(tokenizer):
    tokenizer.pad_token = None
    with pytest.raises(FormatError, match="^pad_token: "):
        check_tokenizer(tokenizer)


def test_generation_prompt_is_the_training_prefix(tokenizer):
    # Train/serve skew check: the prompt the model sees at inference is exactly the prefix it was
    # trained on before its answer.
    sample = tokenize_conversation(tokenizer, CONVERSATION[:2], max_length=512)
    prompt = encode_generation_prompt(tokenizer, CONVERSATION[:1])
    assert sample.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in sample.labels[: len(prompt)])
    assert render_generation_prompt(tokenizer, CONVERSATION[:1]).endswith("<|assistant|>")


def test_format_dataset_writes_samples_and_counts(tokenizer, tiny_rows_path, tmp_path):
    out = tmp_path / "tokenized.jsonl"
    report = format_dataset(tokenizer, tiny_rows_path, out, max_length=512)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.n_rows == report.n_written == len(rows) == 64
    assert report.eos_unmasked_turns == 64 and report.pad_is_eos is False
    assert all(r["labels"][-1] == tokenizer.eos_token_id for r in rows)
    assert 0 < report.trainable_token_fraction < 1


def test_rows_with_nothing_left_to_learn_are_reported(tokenizer, tiny_rows_path, tmp_path):
    prompt_len = len(encode_generation_prompt(tokenizer, [{"role": "user", "content": "repeat red cat"}]))
    report = format_dataset(tokenizer, tiny_rows_path, tmp_path / "t.jsonl", max_length=prompt_len - 1)
    assert report.n_written == 0
    assert report.n_no_trainable_tokens == 64
    assert report.rejected_lines[:3] == [1, 2, 3]
