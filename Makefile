# Quickstart: `make train` (2 processes under torchrun, CPU is fine) and `make test` (the whole suite).
# Both create .venv and install everything on first use. Between commits: `make test-quick` (no Slurm, no
# separate hosts, no multi-run fixtures; a few minutes) and `make lint`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch wheels: the pinned pair below is what CI uses; any torch>=2.4 works (see pyproject.toml).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA ?= $(or $(MNIST_DATA_DIR),$(if $(wildcard ../shared/data/MNIST/raw),../shared/data,./data))
NPROC ?= 2

.PHONY: train test test-quick lint bench setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) -m mnist_dist.train --data-dir $(DATA) $(ARGS)

TEST_ENV := MNIST_DATA_DIR=$(if $(wildcard $(DATA)/MNIST/raw),$(abspath $(DATA)),)
# three pytest-xdist workers, a test file each at a time (module fixtures are shared within a file): the
# suite waits on Slurm, timeouts and sockets a third of its time on two cores, which the workers fill
WORKERS ?= 3
XDIST := $(if $(filter-out 0 1,$(WORKERS)),-n $(WORKERS) --dist loadfile --no-loadscope-reorder,)

test: setup
	$(TEST_ENV) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-quick: setup
	$(TEST_ENV) $(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
