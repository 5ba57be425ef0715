# Two entry points for a fresh machine (see README):
#   make demo  - the main job: digits demo, writes TensorBoard logs under lightning_logs/
#   make test  - the whole test suite: ruff (lint + format), mypy, the documentation site built
#                strictly, pytest (compatibility matrix included: timm, torchvision, the
#                pytorch_lightning package)
# Each creates its own virtual environment on first use and installs what it needs into it: the
# demo a light CPU build of torch (.venv), the tests the torch/torchvision pair timm needs
# (.venv-test, about 5.5 GB, installed from this machine's disk).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch that lies on these machines; installed before the package so that the
# package's own (ranged) requirement is already satisfied and no CUDA build is pulled.
TORCH  ?= torch==2.13.0
# PyPI's torchvision does not import beside the 2.13 CPU build; this pair lies on these machines.
TEST_TORCH ?= torch==2.14.1 torchvision==0.29.1
TEST_VENV  := .venv-test
TBIN       := $(TEST_VENV)/bin
TEST_STAMP := $(TEST_VENV)/.installed

.PHONY: demo test lint typecheck docs pytest matrix bench screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

$(TEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TBIN)/python -m pip install --quiet --upgrade pip
	$(TBIN)/python -m pip install --quiet $(TEST_TORCH)
	$(TBIN)/python -m pip install --quiet -e ".[test,examples,compat,docs]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits.py

lint: $(TEST_STAMP)
	$(TBIN)/ruff check .
	$(TBIN)/ruff format --check .

typecheck: $(TEST_STAMP)
	$(TBIN)/mypy

# the documentation site (mkdocs.yml) into site/: strict, so a broken link, anchor, include or
# docstring reference fails; tests/test_docs.py checks that every public name is documented.
# Not --quiet: it hides the warnings from strict mode, and the build then passes.
docs: $(TEST_STAMP)
	NO_MKDOCS_2_WARNING=1 $(TBIN)/mkdocs build --strict

pytest: $(TEST_STAMP)
	$(TBIN)/python -m pytest tests lightning_reg

# the compatibility matrix alone, written to docs/compat_matrix.md (included in docs/works-with.md)
matrix: $(TEST_STAMP)
	LIGHTNING_REG_MATRIX=docs/compat_matrix.md $(TBIN)/python -m pytest tests/compat tests/test_sam.py tests/test_sam_mixed_precision.py -q

test: lint typecheck docs pytest

# every CPU benchmark (the test environment: some need torchvision); gpu_check.py needs a GPU
bench: $(TEST_STAMP)
	for f in benchmarks/*.py; do [ "$$f" = benchmarks/gpu_check.py ] || $(TBIN)/python $$f || exit 1; done

# TensorBoard screenshots for the docs (by hand; needs Debian's chromium: apt-get install chromium)
screenshots: $(STAMP)
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --quiet playwright
	$(BIN)/python scripts/tensorboard_screenshots.py

clean:
	rm -rf $(VENV) $(TEST_VENV) lightning_logs site .mypy_cache .ruff_cache
