# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
STUDY ?= $(or $(MIMKIT_CACHE),$(HOME)/.cache/mimkit)/study/fmnist_study

.PHONY: setup data demo test lint study clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# Data is an explicit step (library calls never download): a local copy, torchvision's download,
# or Debian's dataset-fashion-mnist package on machines without internet. A no-op once present.
data: setup
	$(BIN)/mimkit data fetch fashion_mnist --apt-update

demo: data
	$(BIN)/mimkit demo --out $(OUT)

# The methods at equal wall-clock on Fashion-MNIST (3.2 h measured on a fast 2-core Xeon, ~7 h on a box half as
# fast; re-running resumes), then
# docs/RESULTS.md and its plots from the run folders.
study: data
	$(BIN)/mimkit study --config fmnist_study --out $(STUDY)
	$(BIN)/mimkit report --study $(STUDY) --out docs/RESULTS.md

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
