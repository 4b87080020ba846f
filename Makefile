# mailwarden: two commands on a fresh Debian machine with Python 3.11.
#   make run   - create .venv, install, start the gateway on its embedded default
#   make test  - install everything the tests need (Debian packages too) and run the suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test venv sysdeps lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

sysdeps:
	bash scripts/install-deps.sh

run: $(STAMP)
	$(BIN)/mailwarden serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	bash scripts/run-tests.sh

test: $(STAMP) sysdeps lint typecheck
	bash scripts/ensure-services.sh
	bash scripts/run-tests.sh

bench: $(STAMP) sysdeps
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/edge_bench.py
	$(BIN)/python bench/relay_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
