"""Malformed config and data files: one line naming the file and the rule, bounded memory, no traceback."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from lora_pipeline.cli import main
from lora_pipeline.config import ConfigError
from lora_pipeline.config_files import load_config
from lora_pipeline.data import sources


@pytest.mark.parametrize(("content", "rule"), [
    (b"\x00\x01\xff\xfe binary", "is binary"),
    ("lora:\n  r: 4  # \u00e9t\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    (b"", "is empty (0 bytes)"),
    (b"[" * 100_000, "nests deeper than a config can"),
    (b"a: " + b"x" * (2 << 20), "a config file is at most"),
    (b"lora: [unclosed", "is not valid YAML"),
])
def test_a_malformed_config_file_is_one_line_naming_the_file_and_the_rule(tmp_path, capsys, content, rule):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="config file .*config.yaml") as refused:
        load_config(path)
    assert rule in str(refused.value)
    assert main(["show-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file") and rule in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_a_huge_jsonl_line_is_quarantined_by_line_number_without_reading_it_into_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 1 << 20)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "rows.jsonl"
    with path.open("wb") as handle:
        handle.write((json.dumps(row) + "\n").encode())
        handle.write(b'{"text": "' + b"x" * (64 << 20) + b'"}\n')  # one 64 MB line
        handle.write((json.dumps(row) + "\n").encode())
    tracemalloc.start()
    rows = list(sources.resolve_source(path).rows())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r.line, r.unparseable) for r in rows] == [(1, False), (2, True), (3, False)]
    assert "line of more than 1048576 bytes" in rows[1].record and "line 2" in rows[1].record
    assert peak < 8 << 20  # a few MB, not the 64 MB line


def test_bad_encoding_and_deep_nesting_in_data_rows_are_quarantined_not_fatal(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + '{"text": "\u00e9"}\n'.encode("latin-1") + b"[" * 100_000 + b"\n")
    rows = list(sources.resolve_source(path).rows())
    assert [(r.line, r.unparseable) for r in rows] == [(1, False), (2, True), (3, True)]
