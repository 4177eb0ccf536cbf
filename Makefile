# The two commands a fresh machine needs:
#   make demo   set up, start a local stack (Redis, one worker, Flower) and answer the examples
#   make test   set up, then lint, type-check and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck pytest bench

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup lint typecheck pytest

lint:
	$(VENV)/bin/ruff check producer worker tests benchmarks scripts

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/bench_engine.py --config small
