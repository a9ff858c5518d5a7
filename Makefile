# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/mimkit demo --out $(OUT)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
