# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test clean bench-data bench-train

setup: $(STAMP)

# Re-installs when pyproject.toml changes. torch is pinned to the local CPU wheel (see pyproject).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/lora-pipeline run --config configs/demo.yaml --summary-json outputs/demo-summary.json

test: setup
	$(BIN)/python -m pytest

# Speed and memory measurements (not part of the tests): see benchmarks/README.md.
bench-data: setup
	$(BIN)/python -m benchmarks.data_stage --out outputs/benchmarks

bench-train: setup
	$(BIN)/python -m benchmarks.training --out outputs/benchmarks

clean:
	rm -rf outputs .pytest_cache
