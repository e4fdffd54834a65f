# feedsvc developer commands. `make run` and `make test` are the two that matter.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv run test lint unit services services-stop services-status clean bench bench-quick load fuzz

help:
	@echo "make run            embedded service on 127.0.0.1:8080 with a demo graph"
	@echo "make test           start local Redis + Cassandra if needed; ruff, mypy, pytest"
	@echo "make services       start local Redis + Cassandra; prints FEEDSVC_* lines"
	@echo "make services-stop  stop them"
	@echo "make fuzz           schemathesis, 1,000 examples per operation, both backends"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,load]'
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/feedsvc serve --demo

services: venv
	@$(BIN)/python scripts/services.py start

services-stop:
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/services.py stop

services-status:
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/services.py status

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Uses FEEDSVC_CASSANDRA_HOSTS / FEEDSVC_REDIS_URL when set, else starts (or reuses) the
# project's local servers. pytest's exit code 5 ("no tests collected") is not a failure.
test: venv
	@$(WITH_SERVICES); \
	echo "using FEEDSVC_CASSANDRA_HOSTS=$$FEEDSVC_CASSANDRA_HOSTS FEEDSVC_REDIS_URL=$$FEEDSVC_REDIS_URL"; \
	$(BIN)/ruff check .; \
	$(BIN)/mypy; \
	$(BIN)/pytest $(PYTEST_ARGS) || test $$? -eq 5

# Benchmarks and load (run on purpose, not part of `make test`). Results in loadtest/results/.
WITH_SERVICES = set -e; \
	if [ -z "$$FEEDSVC_CASSANDRA_HOSTS" ] || [ -z "$$FEEDSVC_REDIS_URL" ]; then \
		eval "$$($(BIN)/python scripts/services.py start)"; \
		export FEEDSVC_CASSANDRA_HOSTS FEEDSVC_REDIS_URL; \
	fi

bench: venv
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.bench

bench-quick: venv
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.bench --quick

load: venv
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.bench --only locust

# schemathesis against the running service, every check and phase, seeded, with a service
# key and a user token, on the embedded and the Cassandra + Redis backends; prints the counts.
FUZZ_EXAMPLES ?= 1000
fuzz: venv
	@$(WITH_SERVICES); $(BIN)/python -m tests.fuzz.run --examples $(FUZZ_EXAMPLES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
