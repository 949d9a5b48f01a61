# Two commands on a fresh machine:   make demo   |   make test
# Each sets up its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine carries a CPU wheel of torch 2.13.0 (pip takes it from local disk); elsewhere
# override, e.g. `make test TORCH=torch` — medcausal itself accepts any torch >= 2.1.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medcausal demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# Benchmarks comparing against DoWhy live in their own environment (DoWhy pins scipy).
.venv-bench/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet "$(TORCH)"
	.venv-bench/bin/pip install --quiet -e ".[bench]"
	touch .venv-bench/.installed

bench: .venv-bench/.installed
	.venv-bench/bin/python benchmarks/tabular_scm.py

clean:
	rm -rf $(VENV) .venv-bench demo_output
