"""Data stage: every row format and every source type normalises to the same chat rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lora_pipeline.config import DataConfig
from lora_pipeline.data import DataError, read_messages, validate_dataset
from lora_pipeline.data.sources import looks_like_path, resolve_source
from lora_pipeline.data.text import normalise_text


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chat(user: str, answer: str, system: str | None = None) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": turns + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def config(data_format: str = "messages", **overrides) -> DataConfig:
    return DataConfig(format=data_format, min_rows=1, **overrides)


# One logical dataset in every row format; each normalises to EXPECTED.
EXPECTED = [chat("Add 2 and 3.", "5", system="Be brief."), chat("Translate:\n\ncat", "chat")]
FORMAT_ROWS = {
    "messages": EXPECTED,
    "alpaca": [
        {"system": "Be brief.", "instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate:", "input": "cat", "output": "chat"},
    ],
    "sharegpt": [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add 2 and 3."},
                           {"from": "gpt", "value": "5"}]},
        {"conversations": [{"from": "human", "value": "Translate:\n\ncat"}, {"from": "gpt", "value": "chat"}]},
    ],
    "prompt_completion": [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}],
         "completion": [{"role": "assistant", "content": "5"}]},
        {"prompt": "Translate:\n\ncat", "completion": "chat"},
    ],
}


@pytest.mark.parametrize("data_format", sorted(FORMAT_ROWS))
def test_each_format_normalises_to_chat_messages(tmp_path, data_format):
    source = write_jsonl(tmp_path / "train.jsonl", FORMAT_ROWS[data_format])
    result = validate_dataset(config(data_format), source, tmp_path / "out")
    assert (result.n_input, result.n_clean, result.n_quarantined) == (2, 2, 0)
    assert read_jsonl(result.clean_path) == EXPECTED
    assert read_messages(source, data_format) == EXPECTED


def test_text_format(tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "  one  line \n"}, {"text": "two"}, {"text": " "}])
    result = validate_dataset(config("text", max_reject_fraction=0.5), source, tmp_path / "out")
    assert read_jsonl(result.clean_path) == [{"text": "one line"}, {"text": "two"}]
    assert json.loads(result.quarantine_path.read_text()) == {"line": 3, "reasons": ["empty_text"],
                                                              "record": {"text": " "}}
    assert result.success  # the text suite has no role expectations


def test_whitespace_and_unicode_normalisation():
    assert normalise_text("  a \t\t b  \r\n\r\n    indented  x\u00a0\u00a0y  \n") == "a b\n\n    indented x y"
    assert normalise_text("caf\u0065\u0301") == "caf\u00e9"  # NFC: e + combining acute -> é
    assert normalise_text(" \t\n ") == ""


def test_messages_roles_are_lowercased_and_extra_keys_dropped(tmp_path):
    row = {"messages": [{"role": "User", "content": "hi", "name": "x"}, {"role": "ASSISTANT", "content": "yo"}],
           "id": 7}
    source = write_jsonl(tmp_path / "t.jsonl", [row])
    result = validate_dataset(config(), source, tmp_path / "out")
    assert read_jsonl(result.clean_path) == [chat("hi", "yo")]


ALPACA = FORMAT_ROWS["alpaca"]


def _save_hf(rows: list[dict], path: Path, as_dict: bool) -> Path:
    from datasets import Dataset, DatasetDict

    dataset = Dataset.from_list(rows)
    (DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(path))
    return path


def _write_json(document: object, path: Path) -> Path:
    path.write_text(json.dumps(document))
    return path


def _write_frame(rows: list[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


SOURCE_WRITERS = {
    "jsonl": lambda d: write_jsonl(d / "train.jsonl", ALPACA),
    "json_list": lambda d: _write_json(ALPACA, d / "train.json"),
    "json_data": lambda d: _write_json({"data": ALPACA}, d / "train.json"),
    "json_really_jsonl": lambda d: write_jsonl(d / "train.json", ALPACA),
    "csv": lambda d: _write_frame(ALPACA, d / "train.csv"),
    "parquet": lambda d: _write_frame(ALPACA, d / "train.parquet"),
    "save_to_disk": lambda d: _save_hf(ALPACA, d / "saved", as_dict=False),
    "save_to_disk_dict": lambda d: _save_hf(ALPACA, d / "saved", as_dict=True),
}


@pytest.mark.parametrize("kind", sorted(SOURCE_WRITERS))
def test_each_source_type(tmp_path, kind):
    source = SOURCE_WRITERS[kind](tmp_path)
    result = validate_dataset(config("alpaca"), source, tmp_path / "out")
    assert read_jsonl(result.clean_path) == EXPECTED
    assert (result.n_input, result.n_quarantined) == (2, 0)


def test_data_file_folder_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", FORMAT_ROWS["sharegpt"])
    result = validate_dataset(config("sharegpt"), folder, tmp_path / "out")
    assert read_jsonl(result.clean_path) == EXPECTED


def test_hub_name_calls_load_dataset_train_split(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return FORMAT_ROWS["messages"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = validate_dataset(config(), "teknium/OpenHermes-2.5", tmp_path / "out")
    assert calls == [("teknium/OpenHermes-2.5", "train")]
    assert result.n_clean == 2


def test_csv_rows_are_numbered_and_json_columns_decoded(tmp_path):
    frame = pd.DataFrame({"messages": [json.dumps(row["messages"]) for row in EXPECTED] + ["not json", ""]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    result = validate_dataset(config(), tmp_path / "train.csv", tmp_path / "out")
    assert read_jsonl(result.clean_path) == EXPECTED
    assert [(q["line"], q["reasons"]) for q in read_jsonl(result.quarantine_path)] == [
        (3, ["wrong_type"]), (4, ["wrong_type"])]


@pytest.mark.parametrize("missing", ["data/none.jsonl", "./nothing", "/abs/dir/x", "a/b/c", "rows.csv"])
def test_missing_local_file_names_the_path(tmp_path, missing):
    assert looks_like_path(missing)
    with pytest.raises(DataError, match="not found: .*" + Path(missing).name):
        validate_dataset(config(), missing, tmp_path / "out")
    with pytest.raises(DataError, match=str(tmp_path / "gone.jsonl")):
        read_messages(tmp_path / "gone.jsonl", "messages")


@pytest.mark.parametrize("hub_id", ["squad", "tatsu-lab/alpaca", "teknium/OpenHermes-2.5"])
def test_hub_ids_are_not_paths(hub_id):
    assert not looks_like_path(hub_id)
    assert resolve_source(hub_id).kind == "hub"


def test_unsupported_suffix_and_builtin_are_errors(tmp_path):
    (tmp_path / "rows.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported .*rows.xlsx|rows.xlsx.*unsupported"):
        resolve_source(tmp_path / "rows.xlsx")
    with pytest.raises(DataError, match="builtin:demo"):
        resolve_source("builtin:demo")


def test_read_messages_raises_naming_file_line_and_rule(tmp_path):
    source = write_jsonl(tmp_path / "eval.jsonl", [EXPECTED[0], "", {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError) as info:
        read_messages(source, "messages")
    assert str(source) in str(info.value) and "line 3" in str(info.value) and "bad_roles" in str(info.value)
    bad_json = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(DataError, match="bad.jsonl line 1: .*unparseable"):
        read_messages(bad_json, "messages")
    assert read_messages(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), "text") == [{"text": "a"}]
