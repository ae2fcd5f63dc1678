# voxeldose — two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_WORKERS ?= 2

.PHONY: demo test lint setup bench clean help

help:
	@echo "make demo   - set up .venv and run the main job on the embedded synthetic patient"
	@echo "make test   - set up .venv, run the linters and the test suite"
	@echo "make lint   - ruff (lint + format check), mypy, import-linter"
	@echo "make bench  - run the CPU benchmarks (figures go to benchmarks/RESULTS.md by hand)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet 'torch==2.13.0'  # the CPU build here; the 'recon' extra then takes no other torch
	$(PIP) install --quiet -e '.[service,test,recon]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/voxeldose demo --out demo-output

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -q --durations=15

bench: setup
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_demo.py
	$(PY) benchmarks/bench_dose.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
