# One command to run the demo, one to run the tests; both set themselves up first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint bench install redis-server

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

install: $(BIN)/.installed

redis-server:
	@bash scripts/ensure-redis.sh

demo: $(BIN)/.installed
	@bash scripts/ensure-redis.sh --optional
	$(BIN)/sandqueue demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .

test: $(BIN)/.installed redis-server lint
	$(BIN)/pytest

bench: $(BIN)/.installed redis-server
	$(BIN)/python -m bench
