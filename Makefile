# hlsrelay: `make run` starts the proxy, `make test` sets up everything and runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= config/hlsrelay.toml

.PHONY: install run test test-fast check bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	@echo "hlsrelay on http://127.0.0.1:8080 (config: $(CONFIG)). In another shell, get a proxied URL with:"
	@echo "  $(BIN)/hlsrelay sign 'https://example.com/master.m3u8' --referer 'https://example.com/' --config $(CONFIG)"
	$(BIN)/hlsrelay serve --config $(CONFIG)

system-deps:
	@bash tests/system-deps.sh

test: install system-deps
	$(BIN)/python -m pytest

check: install
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

bench: install system-deps
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
