"""Build the demo world once per spec and cache it on disk under its spec hash.

A world is built in a temporary directory beside its final place and renamed into place only when
every file (and the ``COMPLETE`` marker) is written, so an interrupted build is never mistaken for
a finished one; a later call with the same spec returns the cached paths without doing any work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.build_once import COMPLETE_MARKER, build_once
from lora_pipeline.demo_world.corpus import WorldRows, build_world_rows
from lora_pipeline.demo_world.lexicon import build_lexicon
from lora_pipeline.demo_world.spec import FORMAT_VERSION, DemoWorldSpec

#: Default generation budget saved in generation_config.json (longest answer is ~10 tokens).
_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class DemoWorld:
    """Paths of one built world (all absolute, all present)."""

    root: Path
    model_dir: Path  # standard HF dir: config, safetensors weights, tokenizer + chat template, generation config
    train_path: Path  # task training rows (messages JSONL)
    eval_path: Path  # held-out task rows (messages JSONL)
    regression_qa_path: Path  # Q/A the base model already knows (messages JSONL)
    regression_text_path: Path  # held-out general text (JSONL of {"text": ...})

    @classmethod
    def at(cls, root: Path) -> DemoWorld:
        """The layout of a world rooted at ``root`` (does not check that it exists)."""
        data = root / "data"
        return cls(
            root=root,
            model_dir=root / "model",
            train_path=data / "train.jsonl",
            eval_path=data / "eval.jsonl",
            regression_qa_path=data / "regression_qa.jsonl",
            regression_text_path=data / "regression_text.jsonl",
        )


def ensure_demo_world(spec: DemoWorldSpec, cache_root: Path, log: Callable[[str], None] = print) -> DemoWorld:
    """Return the cached world at ``cache_root/<spec_hash>``, building it first if absent.

    Args:
        spec: What to build; its hash names the cache entry.
        cache_root: Directory holding cached worlds (created if missing); made absolute here.
        log: Receives progress lines (pre-training loss, timings).

    Returns:
        The world's paths.
    """
    final = Path(cache_root).expanduser().resolve() / spec.spec_hash()
    return DemoWorld.at(build_once(final, lambda staging: _build(spec, staging, log), log, "demo world"))


def _build(spec: DemoWorldSpec, root: Path, log: Callable[[str], None]) -> None:
    # Imported here: only a build pre-trains (torch, transformers); finding the cached world needs neither.
    from lora_pipeline.demo_world.pretrain import encode_rows, generation_config, pretrain_model
    from lora_pipeline.demo_world.tokenizer import tokenizer_texts, train_tokenizer

    started = time.monotonic()
    world = DemoWorld.at(root)
    lexicon = build_lexicon(spec)
    rows = build_world_rows(spec, lexicon)
    _write_data(world, rows)

    tokenizer = train_tokenizer(tokenizer_texts(rows.pretrain), spec)
    samples = encode_rows(tokenizer, rows.pretrain, spec.max_position_embeddings)
    log(f"demo world: {len(samples)} pre-training rows, vocab {len(tokenizer)}, "
        f"{time.monotonic() - started:.1f}s to prepare")
    pretrain_started = time.monotonic()
    model = pretrain_model(spec, tokenizer, samples, log)
    model.generation_config = generation_config(tokenizer, _MAX_NEW_TOKENS)
    model.save_pretrained(world.model_dir, safe_serialization=True)
    tokenizer.save_pretrained(world.model_dir)

    build_info = {
        "format_version": FORMAT_VERSION,
        "spec_hash": spec.spec_hash(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain_seconds": round(time.monotonic() - pretrain_started, 1),
        "build_seconds": round(time.monotonic() - started, 1),
        "rows": {name: len(getattr(rows, name)) for name in ("pretrain", "train", "eval", "regression_qa",
                                                            "regression_text")},
        "zerbic_lexicon": dict(zip(lexicon.english, lexicon.zerbic, strict=True)),
    }
    (root / "build.json").write_text(json.dumps(build_info, indent=2))
    (root / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True))
    # Written last: its presence is what makes the world trusted.
    (root / COMPLETE_MARKER).write_text(spec.spec_hash() + "\n")


def _write_data(world: DemoWorld, rows: WorldRows) -> None:
    data_dir = world.train_path.parent
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(world.train_path, rows.train)
    _write_jsonl(world.eval_path, rows.eval)
    _write_jsonl(world.regression_qa_path, rows.regression_qa)
    _write_jsonl(world.regression_text_path, rows.regression_text)
    # Kept for inspection and decontamination audits; the pipeline does not read it.
    _write_jsonl(data_dir / "pretrain.jsonl", rows.pretrain)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
