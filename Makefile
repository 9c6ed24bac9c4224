# Quick start: `make serve` (demo server on CPU) and `make test` (whole suite). Both set up first.
# `make test-fast`: everything but the vLLM engine tests (~1 min); `make lint`: ruff (CI runs it).
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
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
