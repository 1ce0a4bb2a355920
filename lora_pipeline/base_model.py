"""Where a base model comes from and what it is: GGUF conversion, a fingerprint of its weights, its stop tokens.

``model.name_or_path`` may be a hub id, a local Hugging Face model directory or a local ``.gguf`` file
(what llama.cpp and Ollama users hold). A GGUF file is de-quantised once into a plain model directory
cached under the file's SHA-256, and is then treated like any other local base.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_pipeline.build_once import COMPLETE_MARKER, build_once

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
#: What a converted directory records about the file it came from.
SOURCE_FILENAME = "gguf_source.json"
#: Files whose bytes are a model's weights (what a local directory's fingerprint hashes).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_CHUNK = 1 << 22


def is_gguf_file(name_or_path: str | Path) -> bool:
    """True for a path to a ``.gguf`` file (the file itself must exist to be used)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, cache_root: Path, log: Callable[[str], None] = logger.info) -> Path:
    """De-quantise ``gguf_path`` once into ``cache_root/<stem>-<sha256[:16]>`` (a float32 HF model dir).

    transformers loads a GGUF file de-quantised but refuses to ``save_pretrained`` it (the model still
    carries the GGUF quantizer), so the weights are moved into a plain instance of the same class,
    built from the config without ``quantization_config``. The directory is built once
    (:func:`lora_pipeline.build_once.build_once`): a crash or a concurrent conversion never leaves a
    half directory.

    Returns:
        The model directory (weights, tokenizer with its chat template, generation config).
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    digest = file_sha256(gguf_path)
    final = Path(cache_root).expanduser().resolve() / f"{gguf_path.stem}-{digest[:16]}"
    return build_once(final, lambda staging: _dequantize_into(gguf_path, digest, staging), log, "GGUF conversion")


def _dequantize_into(gguf_path: Path, digest: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init of weights that are replaced right away
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / SOURCE_FILENAME).write_text(json.dumps({"file": gguf_path.name, "sha256": digest}, indent=2))
    (out_dir / COMPLETE_MARKER).write_text("")


def _local_weights_digest(model_dir: Path) -> str:
    """SHA-256 over a local model directory's weight files (names and bytes); a directory converted from
    GGUF is identified by the file's hash it records, as the file itself would be."""
    source = model_dir / SOURCE_FILENAME
    if source.is_file():
        return "gguf-sha256:" + json.loads(source.read_text())["sha256"]
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in files:
        digest.update(str(path.relative_to(model_dir)).encode())
        digest.update(file_sha256(path).encode())
    return "sha256:" + digest.hexdigest()


def base_fingerprint(name_or_path: str, revision: str | None) -> str:
    """What identifies the base weights: the weights' hash for a local directory or GGUF file, else the
    hub id and the commit its revision resolves to in the local hub cache (the revision as given when
    it cannot be resolved offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _local_weights_digest(path.resolve())
    if path.is_file():
        return "gguf-sha256:" + file_sha256(path)
    try:
        from huggingface_hub import snapshot_download

        commit = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached locally (offline): fall back to what the user pinned
        commit = revision or "unresolved"
    return f"hub:{name_or_path}@{commit}"


def generation_eos_ids(model_dir_or_id: str | Path, revision: str | None = None) -> list[int]:
    """``eos_token_id`` of the model's ``generation_config.json`` as a list (empty when it has none)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(model_dir_or_id), revision=revision)
    except OSError:  # no generation_config.json: the tokenizer's EOS and the template decide
        return []
    eos: Any = config.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def model_stop_ids(name_or_path: str | Path, revision: str | None, tokenizer: Any) -> list[int]:
    """The model's whole stop set: the tokenizer's EOS, its template's end-of-turn token and every
    ``generation_config.eos_token_id`` (see :func:`lora_pipeline.formatting.stop_token_ids`)."""
    from lora_pipeline.formatting import stop_token_ids

    return stop_token_ids(tokenizer, generation_eos_ids(name_or_path, revision))


def resolve_base_dir(base_model: str, revision: str | None = None) -> Path:
    """The local Hugging Face model directory of ``base_model``, without network access.

    A hub id resolves to its snapshot of ``revision`` in the local hub cache (where training
    downloaded it): MLflow's own hub reference would record the hub's *latest* commit instead of the
    pinned revision, and needs the Hub at logging time.

    Args:
        base_model: Local model directory, or hub id.
        revision: Hub revision (branch, tag or commit) of a hub id; ignored for a directory.

    Returns:
        The absolute directory (it has a ``config.json``).

    Raises:
        FileNotFoundError: not a model directory, and not a hub id cached locally at ``revision``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    path = Path(base_model).expanduser()
    if not path.is_dir():
        try:
            path = Path(snapshot_download(base_model, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError) as exc:
            raise FileNotFoundError(f"base model {base_model!r} is neither a local directory nor in the local "
                                    f"Hugging Face cache at revision {revision or 'main'}: {exc}") from exc
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model (config.json) in base directory {path}")
    return path.resolve()
