"""Data stage at scale: bounded memory and batched tokenization, with outcomes identical to the one-row paths.

The stage keeps 8 bytes per distinct row for de-duplication (a FingerprintSet), validates the clean table
with GX in fixed-size chunks, and templates + tokenizes rows in batches. Each of these is checked here
against the straightforward implementation it replaces: a Python set, one GX run over the whole table,
``formatting.tokenize_row`` one row at a time, ``json.dumps``, numpy/pandas statistics.
"""

from __future__ import annotations

import copy
import json
import random
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lora_pipeline.data.cleaning as cleaning
import lora_pipeline.data.expectations as expectations
import lora_pipeline.data.profile as profile_module
import lora_pipeline.data.writer as writer
from lora_pipeline.config import DataConfig
from lora_pipeline.data import validate_dataset
from lora_pipeline.data.dedup import FingerprintSet
from lora_pipeline.data.expectations import SuiteBounds, build_expectations, run_suite
from lora_pipeline.data.profile import ColumnStats, Profile
from lora_pipeline.data.text import matching_key, normalise_text
from lora_pipeline.data.tokens import BatchTokenizer, SampleCounts
from lora_pipeline.formatting import RowFormatError, TokenizedSample, stop_token_ids, tokenize_row
from tests.test_data_formats import chat, read_jsonl, write_jsonl
from tests.test_data_quarantine import NO_SYSTEM_ROLE

# --- exact de-duplication in 8 bytes per row ------------------------------------------------------------


def test_fingerprint_set_says_what_a_python_set_says():
    rng = random.Random(3)
    seen: set[int] = set()
    keys = FingerprintSet(max_run_keys=16)  # tiny runs: merges and the run cap are exercised
    pool = [rng.getrandbits(64) - (1 << 63) for _ in range(300)] + [-(1 << 63), (1 << 63) - 1, 0]
    for _ in range(200):
        batch = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        expected = []
        for key in batch:
            expected.append(key in seen)
            seen.add(key)
        assert keys.add_batch(batch).tolist() == expected
    assert len(keys) == len(seen) and keys.nbytes == 8 * len(seen)
    assert all(key in keys for key in seen) and 12345 not in keys


# --- text fast paths ---------------------------------------------------------------------------------------

_HORIZONTAL_RUN = re.compile(r"[^\S\n]+")
_LEADING_INDENT = re.compile(r"^[ \t]*")


def _normalise_text_reference(text: str) -> str:
    """normalise_text without its fast path (the general path, as it was)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        indent = _LEADING_INDENT.match(line).group(0)
        body = _HORIZONTAL_RUN.sub(" ", line[len(indent):]).rstrip()
        lines.append(indent + body if body else "")
    return "\n".join(lines).strip()


def _random_text(rng: random.Random) -> str:
    alphabet = list("ab Z.") * 6 + [" ", "  ", "\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u00a0",
                                     "\u2028", "e\u0301", "\u00e9", "\ufb01", "\u0130", "\u00df"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))


def test_normalise_text_and_matching_key_fast_paths_change_nothing():
    rng = random.Random(5)
    for _ in range(20_000):
        text = _random_text(rng)
        assert normalise_text(text) == _normalise_text_reference(text), repr(text)
        reference_key = re.sub(r"\s+", " ", _normalise_text_reference(text).casefold()).strip()
        assert matching_key(text) == reference_key, repr(text)


def test_row_line_is_json_dumps():
    rng = random.Random(11)
    for _ in range(3_000):
        texts = [_random_text(rng) + rng.choice(['"', "\\", "\x00", "\u2603", "\U0001f600", "/", ""]) for _ in range(3)]
        for row in ({"messages": [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]},
                    {"text": texts[2]}, {"messages": []}):
            assert cleaning.row_line(row) == (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


# --- batched tokenization == tokenize_row ----------------------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: A template that writes no stop token after the answer "nostop" and renders a prompt ending in "drift"
#: differently once an answer follows (both must be template errors, with tokenize_row's messages).
QUIRKY = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
          "{% if m['content'] != 'nostop' %}{{ eos_token }}{% endif %}{% else %}{{ '<|' + m['role'] + '|>' }}"
          "{{ m['content'] }}{% if loop.last and m['content'] == 'drift' %}X{% endif %}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = "red green blue cat dog fox the quick brown jumps over lazy hello world paris answer yes no".split()


def _conversations(rng: random.Random, n: int) -> list[dict]:
    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for _ in range(n):
        turns = [{"role": "system", "content": words(3)}] if rng.random() < 0.15 else []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            turns += [{"role": "user", "content": words(rng.choice((1, 4, 12, 40)))},
                      {"role": "assistant", "content": words(rng.choice((1, 3, 9, 50)))}]
        if rng.random() < 0.05:
            turns[-1]["content"] = "nostop"
        if rng.random() < 0.05:
            turns[-2]["content"] = "drift"
        rows.append({"messages": turns})
    return rows


def _reference(tokenizer, row, max_length, stops):
    try:
        return SampleCounts.of(tokenize_row(tokenizer, row, max_length, stops))
    except RowFormatError as exc:
        return f"RowFormatError: {exc}"


@pytest.mark.parametrize("template", ["tiny", "no_system", "chatml", "quirky"])
def test_batched_tokenization_equals_tokenize_row(chat_tokenizer, template):
    tokenizer = copy.deepcopy(chat_tokenizer)
    if template == "no_system":
        tokenizer.chat_template = NO_SYSTEM_ROLE + tokenizer.chat_template
    elif template == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    elif template == "quirky":
        tokenizer.chat_template = QUIRKY
    stops = stop_token_ids(tokenizer)
    rows = _conversations(random.Random(template), 400)
    outcomes = set()
    for max_length in (8, 24, 64, 4096):
        batched = BatchTokenizer(tokenizer, max_length, stops)
        # The fast paths are the ones under test: the direct renderer and the direct Rust encoder are in use.
        assert batched._render is not None and batched._encode.__name__ == "direct"
        got = [outcome if isinstance(outcome, SampleCounts) else f"RowFormatError: {outcome}"
               for outcome in batched.counts(rows)]
        expected = [_reference(tokenizer, row, max_length, stops) for row in rows]
        assert got == expected
        # Only rows the formatter refuses go to the per-row path.
        assert batched.n_fallbacks == sum(isinstance(outcome, str) for outcome in expected)
        outcomes |= {type(outcome).__name__ if not isinstance(outcome, SampleCounts)
                     else ("truncated" if outcome.truncated else "fits")
                     + ("" if outcome.n_trainable else ", nothing to train") for outcome in expected}
    assert {"fits", "truncated", "truncated, nothing to train"} <= outcomes  # the cases are all exercised
    if template in ("no_system", "quirky"):
        assert "str" in outcomes  # template errors too


def test_batched_text_rows_equal_tokenize_row(chat_tokenizer):
    rng = random.Random(2)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 30)))} for _ in range(200)]
    rows.append({"text": "ends in </s>"})
    stops = stop_token_ids(chat_tokenizer)
    for max_length in (1, 2, 16, 1000):
        got = BatchTokenizer(chat_tokenizer, max_length, stops).counts(rows)
        assert got == [_reference(chat_tokenizer, row, max_length, stops) for row in rows]


def test_without_the_fast_paths_the_public_calls_give_the_same(chat_tokenizer, monkeypatch):
    import lora_pipeline.data.tokens as tokens

    rows = _conversations(random.Random(9), 100)
    stops = stop_token_ids(chat_tokenizer)
    fast = BatchTokenizer(chat_tokenizer, 32, stops).counts(rows)
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=100_000)  # transformers' call would undo this
    monkeypatch.setattr(tokens, "_template_renderer", lambda tokenizer: None)
    slow = BatchTokenizer(tokenizer, 32, stops)
    assert slow._encode.__name__ == "public"
    assert slow.counts(rows) == fast == [_reference(chat_tokenizer, row, 32, stops) for row in rows]


# --- GX in chunks == GX on the whole table -------------------------------------------------------------------


def _whole_table_gx(table: pd.DataFrame, bounds: SuiteBounds, chat_rows: bool, out_dir: Path, tokens: bool) -> dict:
    """One GX checkpoint over the whole table (what the stage did before validating in chunks)."""
    import great_expectations as gx
    from great_expectations.checkpoint import Checkpoint

    context = expectations._ephemeral_context(out_dir / "docs")
    batch = context.data_sources.add_pandas("clean_data").add_dataframe_asset("clean_rows")
    suite = context.suites.add(gx.ExpectationSuite(name=expectations.SUITE_NAME))
    for expectation in build_expectations(bounds, chat_rows, tokens):
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(gx.ValidationDefinition(
        name="whole", data=batch.add_batch_definition_whole_dataframe("all_rows"), suite=suite))
    checkpoint = context.checkpoints.add(Checkpoint(name="whole", validation_definitions=[validation],
                                                    result_format=expectations.RESULT_FORMAT))
    (result,) = checkpoint.run(batch_parameters={"dataframe": table}).run_results.values()
    return result.to_json_dict()


def _comparable(result: dict) -> dict:
    return {"success": result["success"], "statistics": result["statistics"],
            "results": [(r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"),
                         r["success"], r["result"], r["exception_info"].get("raised_exception"))
                        for r in result["results"]]}


def _defective_table(n: int, rng: np.random.Generator, tokens: bool) -> pd.DataFrame:
    """A clean table with defects spread over every chunk: long rows, bad roles, empty turns, and
    content_hash values repeated within and across chunks (far apart)."""
    profile = Profile(chat=True, tokens=tokens)
    hashes = rng.integers(-(1 << 63), (1 << 63) - 1, size=n, dtype=np.int64)
    hashes[[5, 17, 40, n - 1]] = hashes[3]  # one value five times, across chunks
    hashes[60] = hashes[2]
    for i in range(n):
        user = "q" * int(rng.integers(1, 60)) if i % 23 else "q" * 400  # past the character budget
        answer = "" if i % 31 == 7 else "a" * int(rng.integers(1, 20))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if i % 29 == 4:
            messages.reverse()
        full = int(rng.integers(4, 40))
        trained = int(rng.integers(0, 3)) if i % 13 == 0 else 1
        sample = TokenizedSample([1] * min(full, 32), [-100] * (min(full, 32) - 1) + [2], truncated=full > 32,
                                 full_length=full, answers_in_budget=1, trained_stops=trained)
        profile.add(i * 2 + 1, {"messages": messages}, int(hashes[i]), sample)
    return profile.to_frame()


@pytest.mark.parametrize("chunk_rows", [13, 1000])
def test_gx_in_chunks_equals_gx_on_the_whole_table(tmp_path, monkeypatch, chunk_rows):
    monkeypatch.setattr(expectations, "UNIQUE_PARTITION_ROWS", 13)
    monkeypatch.setattr(expectations, "_SPILL_BLOCK_ROWS", 5)
    table = _defective_table(101, np.random.default_rng(chunk_rows), tokens=True)
    bounds = SuiteBounds(min_rows=5, max_chars=320, max_tokens=16, max_truncated_fraction=0.2)
    whole = _whole_table_gx(table, bounds, True, tmp_path / "whole", tokens=True)
    outcome = run_suite(table, bounds, True, tmp_path / "chunks", tokens=True, chunk_rows=chunk_rows)
    chunked = json.loads(outcome.result_path.read_text())
    assert _comparable(chunked) == _comparable(whole)
    failed = {f.name: f for f in outcome.failed}
    assert failed["expect_column_values_to_be_unique(column=content_hash)"].lines == [5, 7, 11, 35, 81, 121, 201]
    assert chunked["meta"]["chunks"]["n_chunks"] == -(-101 // chunk_rows)
    assert not list(tmp_path.glob("chunks/.*"))  # the spill file is gone
    assert len(list((tmp_path / "chunks" / "data_docs").glob("validations/**/*.html"))) == 1


@pytest.mark.parametrize("rows", [0, 1, 6])
def test_gx_in_chunks_on_tiny_and_empty_tables(tmp_path, rows):
    table = _defective_table(101, np.random.default_rng(1), tokens=False).iloc[:rows].reset_index(drop=True)
    bounds = SuiteBounds(min_rows=5, max_chars=320, max_tokens=16, max_truncated_fraction=0.2)
    whole = _whole_table_gx(table, bounds, True, tmp_path / "whole", tokens=False)
    chunked = json.loads(run_suite(table, bounds, True, tmp_path / "chunks", chunk_rows=4).result_path.read_text())
    assert _comparable(chunked) == _comparable(whole)


def test_column_stats_are_numpy_and_pandas_exact():
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 10, 97, 1000):
        values = rng.integers(0, rng.choice([3, 50, 10_000]), size=n).astype(np.int32)
        flags = rng.random(n) < 0.3
        stats = ColumnStats(("line", "tokens", "truncated"))
        for start in range(0, n, 7):
            stats.update({"line": np.arange(start, min(start + 7, n)), "tokens": values[start:start + 7],
                          "truncated": flags[start:start + 7]})
        for q in (0, 5, 50, 95, 99, 100):
            assert stats.percentile("tokens", q) == float(np.percentile(values, q))
        assert stats.median("tokens") == pd.Series(values).median()
        assert stats.truncated_mean() == pd.Series(flags).mean()
        assert stats.length_stats()["tokens"]["mean"] == round(float(values.mean()), 2)


# --- the stage end to end: chunked == in one piece -------------------------------------------------------------


def _stage_outputs(result) -> dict:
    report = json.loads(result.report_path.read_text())
    for key in ("seconds", "rows_per_second", "gx"):
        report.pop(key)
    gx = json.loads(result.out_dir.joinpath("gx_validation_result.json").read_text())
    return {"clean": result.clean_path.read_bytes(), "quarantine": result.quarantine_path.read_bytes(),
            "report": report, "gx": _comparable(gx)["results"]}


def test_stage_in_small_chunks_writes_what_it_writes_in_one(tmp_path, chat_tokenizer, monkeypatch):
    rows: list = []
    for i, row in enumerate(_conversations(random.Random(1), 700)):
        rows.append(row)
        if i % 50 == 3:
            rows.append("{not json")
        if i % 40 == 9:
            rows.append(copy.deepcopy(rows[max(0, len(rows) - 300)]))  # a duplicate far back
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = QUIRKY
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    config = DataConfig(min_rows=5, max_length=48, max_reject_fraction=0.9, max_truncated_fraction=0.5)

    def run(name):
        return validate_dataset(config, source, tmp_path / name, tokenizer=tokenizer, special_tokens=["</s>"],
                                held_out_fraction=0.05)

    whole = run("whole")
    monkeypatch.setattr(profile_module, "CHUNK_ROWS", 37)
    monkeypatch.setattr(expectations, "UNIQUE_PARTITION_ROWS", 50)
    monkeypatch.setattr(writer, "ROW_BATCH", 16)
    monkeypatch.setattr(cleaning, "FingerprintSet", lambda: FingerprintSet(max_run_keys=32))
    chunked = run("chunked")
    assert _stage_outputs(chunked) == _stage_outputs(whole)
    assert chunked.eval_path.read_bytes() == whole.eval_path.read_bytes()
    assert {"duplicate", "unparseable", "template_error", "no_trainable_tokens"} <= set(whole.reason_counts)
    meta = json.loads(chunked.out_dir.joinpath("gx_validation_result.json").read_text())["meta"]["chunks"]
    assert meta["n_chunks"] == -(-chunked.n_clean // 37) and meta["unique_partitions"] > 1
    assert sorted(p.name for p in chunked.out_dir.iterdir()) == sorted(p.name for p in whole.out_dir.iterdir())


def test_a_tokenizer_error_in_the_worker_reaches_the_caller_and_leaves_no_partial_files(tmp_path, chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None  # chat rows cannot be templated at all: apply_chat_template raises
    source = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(3000)])
    with pytest.raises(ValueError, match="chat template"):
        validate_dataset(DataConfig(min_rows=1), source, tmp_path / "out", tokenizer=tokenizer, stop_ids=[2])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != "data_docs") == []
    assert read_jsonl(source)[0] == chat("q0", "a0")
