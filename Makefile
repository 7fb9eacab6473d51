# Quickstart: `make train` (2 processes under torchrun, CPU is fine) and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch wheels: the pinned pair below is what CI uses; any torch>=2.4 works (see pyproject.toml).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA ?= $(or $(MNIST_DATA_DIR),$(if $(wildcard ../shared/data/MNIST/raw),../shared/data,./data))
NPROC ?= 2

.PHONY: train test bench setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) -m mnist_dist.train --data-dir $(DATA) $(ARGS)

test: setup
	MNIST_DATA_DIR=$(if $(wildcard $(DATA)/MNIST/raw),$(abspath $(DATA)),) $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
