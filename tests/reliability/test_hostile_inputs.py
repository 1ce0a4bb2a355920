"""Hostile inputs: malformed config and data files, remote code, paths and names that climb out, a changed run.

Malformed files get one line naming the file and the rule, in bounded memory, with no traceback. Remote code runs
only at a pinned commit; paths and names that climb out or hide are refused before anything runs; a changed
dataset or config is a new run key (a fresh run, never a mixed resume).
"""

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


def test_a_one_gigabyte_line_at_the_default_limit_is_quarantined_in_bounded_memory(tmp_path):
    """The issue's case as is: a 1 GB single line (a sparse file: no disk is spent) between two good rows."""
    row = (json.dumps({"text": "fine"}) + "\n").encode()
    path = tmp_path / "rows.jsonl"
    with path.open("wb") as handle:
        handle.write(row + b'{"text": "')
        handle.seek(1 << 30, 1)  # a hole of 1 GiB: read back as NUL bytes
        handle.write(b'"}\n' + row)
    tracemalloc.start()
    rows = list(sources.resolve_source(path).rows())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r.line, r.unparseable) for r in rows] == [(1, False), (2, True), (3, False)]
    assert f"line of more than {sources.MAX_ROW_BYTES} bytes" in rows[1].record
    assert peak < 3 * sources.MAX_ROW_BYTES  # about twice the row limit (readline buffers), not the gigabyte


def test_bad_encoding_and_deep_nesting_in_data_rows_are_quarantined_not_fatal(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + '{"text": "\u00e9"}\n'.encode("latin-1") + b"[" * 100_000 + b"\n")
    rows = list(sources.resolve_source(path).rows())
    assert [(r.line, r.unparseable) for r in rows] == [(1, False), (2, True), (3, True)]


def test_remote_code_runs_only_at_a_full_commit_hash():
    """A branch or tag can move after review; only a 40-hex commit pins the code trust_remote_code runs."""
    for revision in ("main", "v1.0", "abc123"):
        with pytest.raises(ConfigError, match="full 40-character commit"):
            load_config(None, ["model.trust_remote_code=true", f"model.revision={revision}"])
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert load_config(None, ["model.trust_remote_code=true", f"model.revision={commit}"]).model.revision == commit


def test_paths_and_names_that_climb_out_or_hide_are_refused_before_anything_runs(tmp_path):
    """``..``, URL-encoded forms, paths outside the allowed roots and symlinks out of them; model names that
    are not plain names. Refused when the config is built: before any read or write."""
    from lora_pipeline.run_request import DATA_ROOTS_ENV, RunOverrides, load_run_config

    for override, rule in [("output_dir=outputs/../../etc", "climb out"), ("data.path=data/../../x.jsonl", "climb out"),
                           ("data.eval_path=data/%2e%2e/x.jsonl", "URL-encoded"),
                           ("output_dir=out%2F..%2Fetc", "URL-encoded"),
                           ("registry.model_name=../other", "registry.model_name"),
                           ("registry.model_name=a/b", "registry.model_name")]:
        with pytest.raises(ConfigError, match=rule):
            load_config(None, [override])
    with pytest.raises(ValueError, match="registry_model_name"):
        RunOverrides(registry_model_name="x%2F..%2Fy")
    # A run form's data_path: only under the worker's config or data roots, symlinks resolved first.
    roots = tmp_path / "data-root"
    roots.mkdir()
    (roots / "rows.jsonl").write_text("{}\n")
    (roots / "link-out.jsonl").symlink_to("/etc/hostname")
    environ = {DATA_ROOTS_ENV: str(roots)}
    ok = load_run_config("configs/demo.yaml", RunOverrides(data_path=str(roots / "rows.jsonl")), environ=environ)
    assert ok.data.path == str(roots / "rows.jsonl")
    for outside in ("/etc/passwd", str(roots / "link-out.jsonl")):
        with pytest.raises(ConfigError, match="a run may only read data under"):
            load_run_config("configs/demo.yaml", RunOverrides(data_path=outside), environ=environ)


def test_run_key_covers_what_changes_the_adapter_and_nothing_else():
    def key(*overrides: str, data: str = "data-hash", base: str = "sha256:base") -> str:
        return load_config(None, ["data.path=train.jsonl", *overrides]).run_key(data, base)

    reference = key()
    # Judging, tracking, registering or placing the result never retrains.
    for unrelated in ("gate.min_task_gain=0.9", "eval.max_new_tokens=7", "eval.match=normalized",
                      "registry.model_name=other", "registry.store=adapter", "mlflow.experiment_name=x",
                      "merge.parity_samples=3", "output_dir=/elsewhere", "data.eval_path=held_out.jsonl",
                      "data.path=moved/train.jsonl", "model.name_or_path=/moved/model"):
        assert key(unrelated) == reference, unrelated
    # What training reads does.
    for relevant in ("lora.r=8", "train.learning_rate=1e-4", "quant.quant_type=fp4", "data.max_length=64",
                     "model.chat_template=chatml", "train.optim=adamw_torch"):
        assert key(relevant) != reference, relevant
    assert key(data="other-data") != reference and key(base="sha256:other-weights") != reference
