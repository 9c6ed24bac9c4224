# Quick start: `make serve` (demo server on CPU) and `make test` (whole suite). Both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast bench lint clean

setup:
	@bash scripts/setup_env.sh $(VENV)

serve: setup
	$(VENV)/bin/lookm-serve $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.capacity $(ARGS)
	$(PY) -m benchmarks.decode

lint: setup
	$(PY) -m ruff check lookm_vllm server tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
