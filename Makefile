# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-stress docs-check install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	# The CPU wheel of torch must be installed first, pinned exactly.
	$(BIN)/pip install --quiet torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/gptkit demo

test: install-dev
	$(BIN)/python -m pytest -q

# The docs' examples that need nothing before them, run again and compared with what the pages show
# (also part of `make test`).
docs-check: install-dev
	$(BIN)/python -m pytest -q tests/test_docs.py

# The suite 3 times under load (two busy loops per core), in three file orders; RUNS=N for more.
test-stress: install-dev
	bash tests/stress.sh

clean:
	rm -rf $(VENV) runs
