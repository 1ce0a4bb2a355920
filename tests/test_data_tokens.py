"""Data stage, token level: rows are templated and truncated as training will see them, then checked."""

from __future__ import annotations

import copy
import json

from lora_pipeline.config import DataConfig
from lora_pipeline.data import validate_dataset
from lora_pipeline.data.expectations import SuiteBounds, run_suite
from lora_pipeline.data.profile import Profile
from lora_pipeline.formatting import TokenizedSample
from tests.test_data_formats import chat, read_jsonl, write_jsonl

GOOD = [chat(f"question {i}", f"answer {i}") for i in range(12)]
MAX_LENGTH = 32


def cfg(**overrides) -> DataConfig:
    return DataConfig(**{"min_rows": 5, "max_length": MAX_LENGTH, **overrides})


def long_answer(i: int) -> dict:
    # A short prompt and an answer far past the budget: truncated, but still trainable.
    return chat(f"tell me more {i}", " ".join(["dog cat fox"] * 20))


def test_truncated_rows_are_kept_counted_and_gated(tmp_path, chat_tokenizer):
    source = write_jsonl(tmp_path / "train.jsonl", GOOD + [long_answer(i) for i in range(3)])
    lenient = validate_dataset(cfg(max_truncated_fraction=0.5), source, tmp_path / "ok", tokenizer=chat_tokenizer)
    assert lenient.success and lenient.n_clean == 15 and lenient.n_quarantined == 0
    report = json.loads(lenient.report_path.read_text())
    assert report["token_stats"]["n_truncated"] == 3
    assert report["token_stats"]["truncated_fraction"] == 0.2
    assert report["length_stats"]["tokens"]["max"] > MAX_LENGTH  # the templated length, before truncation
    assert report["length_stats"]["trainable_tokens"]["max"] < MAX_LENGTH

    strict = validate_dataset(cfg(max_truncated_fraction=0.1), source, tmp_path / "strict", tokenizer=chat_tokenizer)
    assert not strict.success
    (failure,) = strict.failures
    assert "expect_column_mean_to_be_between(column=truncated" in failure and "observed 0.2" in failure
    assert str(source) in failure


def test_no_trainable_tokens_is_quarantined_and_nothing_is_lost(tmp_path, chat_tokenizer):
    prompt_fills_budget = chat("word " * 60, "yes")
    source = write_jsonl(tmp_path / "train.jsonl", GOOD + [prompt_fills_budget])
    result = validate_dataset(cfg(max_reject_fraction=0.5), source, tmp_path / "out", tokenizer=chat_tokenizer)
    assert result.reason_counts == {"no_trainable_tokens": 1}
    (quarantined,) = read_jsonl(result.quarantine_path)
    assert quarantined == {"line": 13, "reasons": ["no_trainable_tokens"], "record": prompt_fills_budget}
    assert result.n_clean + result.n_quarantined == 13 and len(read_jsonl(result.clean_path)) == 12


def test_text_rows_get_token_checks(tmp_path, chat_tokenizer):
    rows = [{"text": f"the quick brown fox number {i} jumps"} for i in range(8)]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    result = validate_dataset(cfg(format="text"), source, tmp_path / "out", tokenizer=chat_tokenizer)
    assert result.success, result.failures
    report = json.loads(result.report_path.read_text())
    assert report["token_stats"]["n_truncated"] == 0
    assert report["length_stats"]["trainable_tokens"]["min"] >= 2  # the words and the EOS


def test_eos_check_holds_when_pad_equals_eos(tmp_path, chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    source = write_jsonl(tmp_path / "train.jsonl", GOOD)
    result = validate_dataset(cfg(), source, tmp_path / "out", tokenizer=tokenizer)
    assert result.success, result.failures
    gx = json.loads((result.out_dir / "gx_validation_result.json").read_text())
    pair = [r for r in gx["results"] if r["expectation_config"]["type"] == "expect_column_pair_values_to_be_equal"]
    assert len(pair) == 1 and pair[0]["success"] is True


def test_gx_token_suite_catches_samples_the_formatter_should_have_refused(tmp_path):
    # The suite is independent of the formatter: feed it samples that break each token rule.
    eos = 2
    good = TokenizedSample([1, 5, 6, eos], [-100, -100, 6, eos], truncated=False, full_length=4, answers_in_budget=1,
                           trained_stops=1)
    no_eos = TokenizedSample([1, 5, 6, 7], [-100, -100, 6, 7], truncated=False, full_length=4, answers_in_budget=1,
                             trained_stops=0)
    nothing = TokenizedSample([1, 5, 6, 7], [-100] * 4, truncated=True, full_length=9, answers_in_budget=0,
                              trained_stops=0)
    profile = Profile(chat=True, tokens=True)
    for line in range(1, 11):
        profile.add(line, chat(f"q{line}", f"a{line}"), line, good)
    profile.add(11, chat("q11", "a11"), 11, no_eos)
    profile.add(12, chat("q12", "a12"), 12, nothing)
    bounds = SuiteBounds(min_rows=5, max_chars=1000, max_tokens=8, max_truncated_fraction=0.05)
    outcome = run_suite(profile.to_frame(), bounds, True, tmp_path, tokens=True)
    failed = {failure.name: failure for failure in outcome.failed}
    assert set(failed) == {
        "expect_column_values_to_be_between(column=trainable_tokens, min_value=1.0)",
        "expect_column_mean_to_be_between(column=truncated, min_value=0.0, max_value=0.05)",
        "expect_column_pair_values_to_be_equal(column_A=trained_eos, column_B=answers_in_budget)",
    }
    assert failed["expect_column_values_to_be_between(column=trainable_tokens, min_value=1.0)"].lines == [12]
    assert failed["expect_column_pair_values_to_be_equal(column_A=trained_eos, column_B=answers_in_budget)"].lines \
        == [11]
