# The two commands a fresh machine needs:
#   make demo   set up, start a local stack (Redis, one worker, Flower), answer the examples,
#               print the commands to try against it, and keep it up until Ctrl+C
#   make test   set up, then lint, type-check, run the whole test suite, and dry-run the GPU
#               check script on the CPU (so it cannot rot before a GPU runs it)
# and, as root on a host without Docker (podman instead; ops/README.md):
#   make stack-check   build every image on stand-in bases, run the whole stack with
#                      podman-compose, submit, restart a worker mid-task, take it down
# Every target calls the virtualenv's programs by path: nothing needs activating first.
VENV ?= .venv
PY := $(VENV)/bin/python

DEMO_ARGS ?= --keep

.PHONY: setup demo test lint typecheck pytest gpu-dry-run bench bench-cold-start bench-host stack-check

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

# pytest last: its summary closes the output.
test: setup lint typecheck gpu-dry-run pytest

lint:
	$(VENV)/bin/ruff check producer vision_queue worker tests benchmarks scripts

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q -p no:cacheprovider

# benchmarks/gpu_batching.sh's DRY_RUN: the same steps, tiny, on the CPU (about 35 s).
gpu-dry-run:
	out=$$(mktemp -d) && DRY_RUN=1 PYTHON=$(PY) bash benchmarks/gpu_batching.sh "$$out" \
		&& rm -rf "$$out"

bench: setup
	$(PY) benchmarks/bench_engine.py --config small

bench-cold-start: setup
	$(PY) benchmarks/bench_cold_start.py --runs 5

bench-host: setup
	$(PY) benchmarks/bench_host_overhead.py --sync

stack-check:
	bash ops/stack-check.sh
