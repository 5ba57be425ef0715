# Two entry points for a fresh machine (see README):
#   make demo  - the main job: digits demo, writes TensorBoard logs under lightning_logs/
#   make test  - the whole test suite: ruff (lint + format), mypy, pytest
# Both create .venv on first use and install what they need into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch that lies on these machines; installed before the package so that the
# package's own (ranged) requirement is already satisfied and no CUDA build is pulled.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest tests lightning_reg

test: lint typecheck pytest

bench: $(STAMP)
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) lightning_logs .mypy_cache .ruff_cache
