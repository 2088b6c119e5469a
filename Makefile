# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, and train the demo on 2 CPU workers (or every GPU)
#   make test   create .venv, install, and run the whole test suite (a real SLURM cluster included, as root)
#               but the scale tier
# For contributors:
#   make test-fast   the unit tier only (under 30 s)
#   make test-scale  the scale tier: 8 and 32 CPU ranks on this machine (about 5 minutes on 2 cores)
#   make lint        ruff: lint (imports, bugs, style rules in pyproject.toml)
#   make bench       the benchmarks (prints figures; never fails on a slow machine)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two pytest workers: most tests wait on processes, not on a core. SLURM tests share one worker.
PYTEST_ARGS ?= -q

.PHONY: install demo test test-fast test-scale lint bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The scale tier has its own target: its dozens of processes on 2 cores would double the suite's time.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not scale" $(PYTEST_ARGS)

test-scale: $(STAMP)
	$(BIN)/python -m pytest -m scale $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
