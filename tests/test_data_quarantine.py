"""Data stage: every defect is quarantined with its reason code, nothing is lost, GX gates the run."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from lora_pipeline.config import DataConfig
from lora_pipeline.data import REASONS, ValidationResult, validate_dataset
from lora_pipeline.data.expectations import SuiteBounds, run_suite
from lora_pipeline.data.profile import Profile
from tests.test_data_formats import chat, read_jsonl, write_jsonl

GOOD = [chat(f"question {i}", f"answer {i}") for i in range(12)]
# (row or raw line, expected reasons); the source line of each is its position + 1 (line 3 is blank).
DEFECTS: list[tuple[object, list[str]]] = [
    ("{not json", ["unparseable"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, ["missing_field"]),
    ({"prompt": "no messages key"}, ["missing_field"]),
    ({"messages": "user: hi"}, ["wrong_type"]),
    ({"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "c"}]}, ["wrong_type"]),
    ([1, 2, 3], ["wrong_type"]),
    (chat("   ", "answer"), ["empty_text"]),
    ({"messages": []}, ["empty_text"]),
    ({"messages": [{"role": "user", "content": "q"}]}, ["bad_roles"]),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, ["bad_roles"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a"}]}, ["bad_roles"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, ["bad_roles"]),
    (chat("say </s> now", "ok"), ["special_token_in_text"]),
    (chat("  question   0 ", "answer 0"), ["duplicate"]),  # same as line 1 after normalisation
    (chat("What is the capital of France?", "Paris"), ["contaminated"]),
    (chat("", "</s>"), ["empty_text", "special_token_in_text"]),
    ({"messages": [{"role": "user", "content": "q <pad>"}]}, ["bad_roles", "special_token_in_text"]),
    (chat("what  is the CAPITAL of france?", "Paris."), ["contaminated"]),  # case/space-insensitive match
    (chat("long " * 300, "answer"), ["no_trainable_tokens"]),  # the prompt alone fills data.max_length
    # The fixture's template, like Gemma's, has no system role: the template itself refuses the row.
    ({"messages": [{"role": "system", "content": "be brief"}, *chat("q sys", "a sys")["messages"]]},
     ["template_error"]),
]
#: Prepended to the fixture tokenizer's template: a system turn is refused, as Gemma's template does.
NO_SYSTEM_ROLE = ("{% if messages[0]['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}")
EVAL_ROWS = [chat("What is the capital of France?", "Paris"), chat("2+2?", "4")]
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|user|>"]


def bounds(**overrides) -> SuiteBounds:
    return SuiteBounds(**{"min_rows": 5, "max_chars": 1000, "max_tokens": 128, "max_truncated_fraction": 0.1,
                          **overrides})


def cfg(**overrides) -> DataConfig:
    return DataConfig(**{"min_rows": 5, "max_reject_fraction": 0.9, **overrides})


@pytest.fixture(scope="module")
def defect_run(tmp_path_factory, chat_tokenizer) -> tuple[ValidationResult, Path]:
    root = tmp_path_factory.mktemp("defects")
    source = root / "train.jsonl"
    write_jsonl(source, GOOD[:2] + [""] + [row for row, _ in DEFECTS] + GOOD[2:])
    eval_path = write_jsonl(root / "eval.jsonl", EVAL_ROWS)
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = NO_SYSTEM_ROLE + tokenizer.chat_template
    result = validate_dataset(cfg(), source, root / "out", special_tokens=SPECIAL_TOKENS,
                              decontaminate_against=[eval_path], tokenizer=tokenizer)
    return result, source


def test_each_defect_gets_exactly_its_reasons_and_line(defect_run):
    result, _ = defect_run
    quarantined = read_jsonl(result.quarantine_path)
    expected = [(index + 4, reasons) for index, (_, reasons) in enumerate(DEFECTS)]
    assert [(row["line"], row["reasons"]) for row in quarantined] == expected
    assert quarantined[0]["record"] == "{not json"  # raw text kept
    assert quarantined[5]["record"] == [1, 2, 3]  # original record kept, not the normalised one


def test_nothing_is_lost(defect_run):
    result, _ = defect_run
    assert result.n_input == len(GOOD) + len(DEFECTS)  # the blank line is a separator, not a row
    assert result.n_clean == len(GOOD) and result.n_quarantined == len(DEFECTS)
    assert result.n_clean + result.n_quarantined == result.n_input
    assert len(read_jsonl(result.clean_path)) == result.n_clean
    assert len(read_jsonl(result.quarantine_path)) == result.n_quarantined


def test_duplicates_keep_the_first(defect_run):
    result, _ = defect_run
    clean = read_jsonl(result.clean_path)
    assert clean[0] == GOOD[0] and clean.count(GOOD[0]) == 1


def test_reason_counts_and_report(defect_run):
    result, source = defect_run
    expected: dict[str, int] = {}
    for _, reasons in DEFECTS:
        for reason in reasons:
            expected[reason] = expected.get(reason, 0) + 1
    assert result.reason_counts == dict(sorted(expected.items()))
    assert set(result.reason_counts) == set(REASONS)  # the fixture exercises every code
    report = json.loads(result.report_path.read_text())
    assert report["reason_counts"] == result.reason_counts
    assert (report["n_input"], report["n_clean"], report["n_quarantined"]) == (
        result.n_input, result.n_clean, result.n_quarantined)
    assert report["source"] == str(source)
    assert report["first_lines_by_reason"]["duplicate"] == [17]
    assert report["length_stats"]["n_turns"]["max"] == 2
    assert report["gx"]["success"] is True and report["gx"]["failed_expectations"] == []
    assert report["decontamination"]["n_prompts"] == 2
    assert report["token_stats"]["n_truncated"] == 0 and report["token_stats"]["trainable_tokens"] > 0
    assert report["length_stats"]["tokens"]["max"] <= 128


def test_success_hash_result_and_data_docs(defect_run):
    result, _ = defect_run
    assert result.success and result.failures == []
    assert result.data_hash == hashlib.sha256(result.clean_path.read_bytes()).hexdigest()
    assert result.data_docs_dir == result.out_dir / "data_docs"
    assert (result.data_docs_dir / "index.html").is_file()
    assert list(result.data_docs_dir.glob("validations/**/*.html"))
    gx_result = json.loads((result.out_dir / "gx_validation_result.json").read_text())
    assert gx_result["success"] is True and len(gx_result["results"]) > 10


def test_invalid_utf8_and_bom(tmp_path):
    source = tmp_path / "train.jsonl"
    lines = [json.dumps(row).encode() for row in GOOD[:5]]
    source.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:3] + [b'{"messages": "\xff\xfe"}'] + lines[3:]) + b"\n")
    result = validate_dataset(cfg(), source, tmp_path / "out")
    assert [(row["line"], row["reasons"]) for row in read_jsonl(result.quarantine_path)] == [(4, ["unparseable"])]
    assert result.n_clean == 5


def test_alpaca_defects_list_all_reasons(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 3", "output": "5"},
        {"instruction": "Add.", "input": "2 3"},
        {"instruction": {"text": "Add."}, "output": "5"},
        {"instruction": " ", "output": "\t"},
        {"instruction": "Go", "input": None, "output": "<s>done"},
    ]
    source = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    result = validate_dataset(cfg(format="alpaca", min_rows=1), source, tmp_path / "out", special_tokens=["<s>"])
    assert [(row["line"], row["reasons"]) for row in read_jsonl(result.quarantine_path)] == [
        (2, ["missing_field"]), (3, ["wrong_type"]), (4, ["empty_text"]), (5, ["special_token_in_text"])]


def test_contamination_against_an_alpaca_eval_set(tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", GOOD + [chat("Translate:\n\ncat", "chat")])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Translate:", "input": "cat", "output": "x"}])
    result = validate_dataset(cfg(), source, tmp_path / "out", decontaminate_against=[eval_path])
    assert result.reason_counts == {"contaminated": 1}


def test_too_many_rejects_fails_naming_file_and_lines(tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", GOOD[:8] + ["bad"] * 4)
    result = validate_dataset(cfg(max_reject_fraction=0.2), source, tmp_path / "out")
    assert not result.success
    (message,) = result.failures
    assert "max_reject_fraction" in message and str(source) in message and "lines 9, 10, 11, 12" in message


def test_too_few_rows_fails_rule_and_gx_row_count(tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", GOOD[:3])
    result = validate_dataset(cfg(min_rows=5), source, tmp_path / "out")
    assert not result.success
    assert any("data.min_rows 5" in failure and str(source) in failure for failure in result.failures)
    assert any("expect_table_row_count_to_be_between" in failure for failure in result.failures)


def test_gx_length_expectation_fails_with_offending_lines(tmp_path):
    # max_length=16 tokens -> a 128-character budget; half the rows are far longer.
    rows = [chat(f"q{i} " + "word " * (100 if i % 2 else 1), f"a{i}") for i in range(10)]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    result = validate_dataset(cfg(max_length=16), source, tmp_path / "out")
    assert not result.success and result.n_quarantined == 0
    total = [f for f in result.failures if "expect_column_values_to_be_between(column=total_chars" in f]
    assert len(total) == 1 and "first lines 2, 4, 6, 8, 10" in total[0] and str(source) in total[0]
    report = json.loads(result.report_path.read_text())
    assert report["gx"]["success"] is False and report["success"] is False
    assert (result.data_docs_dir / "index.html").is_file()


def test_no_gx_project_in_working_directory_and_rerun_overwrites(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    source = write_jsonl(tmp_path / "train.jsonl", GOOD)
    out = Path("relative-out")
    first = validate_dataset(cfg(), source, out)
    second = validate_dataset(cfg(), write_jsonl(tmp_path / "train.jsonl", GOOD[:6]), out)
    assert sorted(p.name for p in workdir.iterdir()) == ["relative-out"]
    assert first.out_dir == second.out_dir == (workdir / "relative-out").resolve()
    assert sorted(p.name for p in second.out_dir.iterdir()) == [
        "clean.jsonl", "data_docs", "gx_validation_result.json", "quarantine.jsonl", "report.json"]
    assert second.n_clean == 6 and len(read_jsonl(second.clean_path)) == 6
    assert len(list(second.data_docs_dir.glob("validations/**/*.html"))) == 1


def test_gx_suite_catches_rows_the_cleaning_rules_should_have_removed(tmp_path):
    # The suite checks the clean table independently: feed it rows cleaning would have rejected.
    profile = Profile(chat=True)
    for line in range(1, 11):
        profile.add(line, chat(f"q{line}", f"a{line}"), content_hash=line)
    profile.add(12, {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": ""}]},
                content_hash=1)
    outcome = run_suite(profile.to_frame(), bounds(max_chars=1000), True, tmp_path)
    assert not outcome.success
    failed = {failure.name: failure.lines for failure in outcome.failed}
    assert failed == {
        "expect_column_values_to_be_unique(column=content_hash)": [1, 12],
        "expect_column_values_to_be_between(column=min_turn_chars, min_value=1.0)": [12],
        "expect_column_values_to_be_between(column=answer_chars, min_value=1.0)": [12],
        "expect_column_values_to_be_in_set(column=last_role, value_set=['assistant'])": [12],
        "expect_column_values_to_be_in_set(column=roles_alternate, value_set=[True])": [12],
    }
    assert outcome.result_path.is_file() and (outcome.data_docs_dir / "index.html").is_file()


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_lone_surrogate_escape_is_quarantined_as_unparseable(tmp_path, suffix):
    """``"\\ud800"`` is valid JSON but no UTF-8 text can hold it: the row is quarantined, the rest are kept
    (a surrogate *pair*, an emoji written as two escapes, is ordinary text)."""
    emoji = chat("send a smile", "here it is: \\ud83d\\ude00")
    lone = chat("broken", "half a character: \\ud800 here")
    rows = [json.dumps(row) for row in GOOD[:5]]
    rows[2:2] = [json.dumps(lone).replace("\\\\ud800", "\\ud800"),
                 json.dumps(emoji).replace("\\\\ud83d\\\\ude00", "\\ud83d\\ude00")]
    source = tmp_path / f"train.{suffix}"
    source.write_text("\n".join(rows) + "\n" if suffix == "jsonl" else "[" + ",\n".join(rows) + "]")
    result = validate_dataset(cfg(), source, tmp_path / "out")
    quarantined = read_jsonl(result.quarantine_path)
    assert [(row["line"], row["reasons"]) for row in quarantined] == [(3, ["unparseable"])]
    assert "\\ud800" in json.dumps(quarantined[0]["record"])  # kept as it was written, not lost
    assert result.n_clean == 6
    assert "\U0001F600" in result.clean_path.read_text(encoding="utf-8")
