# Two commands on a fresh machine: `make run` (the sidecar on its embedded store, with
# a demo catalog) and `make test` (the whole suite against real Redis and PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint services clean apigee-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/aforo-sidecar demo

services:
	scripts/ensure-services

# The Apigee bundle's JS tests and apigeelint run under Node (see apigee_policy/).
apigee-deps: apigee_policy/node_modules/.package-lock.json

apigee_policy/node_modules/.package-lock.json: apigee_policy/package-lock.json
	npm ci --prefix apigee_policy --no-audit --no-fund --loglevel=error

test: $(STAMP) services apigee-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache apigee_policy/node_modules
