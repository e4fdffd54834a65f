# feedsvc developer commands. `make run` and `make test` are the two that matter.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv run test lint unit services services-stop services-status clean bench bench-quick load \
	fuzz chaos services-cluster services-cluster-stop services-cluster-status test-cluster

help:
	@echo "make run            embedded service on 127.0.0.1:8080 with a demo graph"
	@echo "make test           start local Redis + Cassandra if needed; ruff, mypy, pytest"
	@echo "make services       start local Redis + Cassandra; prints FEEDSVC_* lines"
	@echo "make services-stop  stop them"
	@echo "make services-cluster       start a 3-node Cassandra cluster + a Redis Cluster (127.0.0.1-3)"
	@echo "make services-cluster-stop  stop it"
	@echo "make test-cluster           start the cluster; store, queue, API and crash suites on it"
	@echo "make fuzz           schemathesis, 1,000 examples per operation, both backends"
	@echo "make chaos          worker, Redis, Cassandra and API faults under load (kills local servers),\n                   then 2,000 recipients notified while providers fail and workers die"

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

# The local cluster: Cassandra on 127.0.0.1-3 (RF 3) and a Redis Cluster of three primaries
# with one replica each (docs/local-servers.md). Started on purpose, not by `make test`.
CLUSTER_SUITES = tests/test_store_contract.py tests/test_queue_contract.py tests/test_api.py \
	tests/test_durability.py tests/test_recipients.py \
	tests/test_crash.py tests/test_cluster_faults.py

services-cluster: venv
	@$(BIN)/python scripts/services.py start --cluster

services-cluster-stop:
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/services.py stop --cluster

services-cluster-status:
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/services.py status --cluster

# Always the cluster's settings (FEEDSVC_CASSANDRA_HOSTS, FEEDSVC_REDIS_URL,
# FEEDSVC_REDIS_CLUSTER, FEEDSVC_REPLICATION), whatever the environment says.
test-cluster: venv
	@set -e; set -a; eval "$$($(BIN)/python scripts/services.py start --cluster)"; set +a; \
	echo "using FEEDSVC_CASSANDRA_HOSTS=$$FEEDSVC_CASSANDRA_HOSTS FEEDSVC_REDIS_URL=$$FEEDSVC_REDIS_URL (cluster)"; \
	$(BIN)/pytest $(PYTEST_ARGS) $(CLUSTER_SUITES)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Uses FEEDSVC_CASSANDRA_HOSTS / FEEDSVC_REDIS_URL when set, else starts (or reuses) the
# project's local servers. pytest's exit code 5 ("no tests collected") is not a failure.
# The status page's browser test needs Debian's chromium and chromium-driver: installed with
# apt when missing (as root); elsewhere that test is skipped, except under CI=true.
test: venv
	@$(WITH_SERVICES); \
	echo "using FEEDSVC_CASSANDRA_HOSTS=$$FEEDSVC_CASSANDRA_HOSTS FEEDSVC_REDIS_URL=$$FEEDSVC_REDIS_URL"; \
	$(BIN)/python scripts/services.py browser >/dev/null || [ "$$CI" != true ]; \
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
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.bench; $(BIN)/python -m loadtest.bench_delivery

bench-quick: venv
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.bench --quick; \
	$(BIN)/python -m loadtest.bench_delivery --followers 2000 --audience 100000

load: venv
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.bench --only locust

# Kills and pauses the local Redis and Cassandra: run on purpose, not beside other work.
chaos: venv
	@$(WITH_SERVICES); $(BIN)/python -m loadtest.chaos $(CHAOS_ARGS); \
	$(BIN)/python -m loadtest.chaos_delivery

# schemathesis against the running service, every check and phase, seeded, with a service
# key and a user token, on the embedded and the Cassandra + Redis backends; prints the counts.
FUZZ_EXAMPLES ?= 1000
fuzz: venv
	@$(WITH_SERVICES); $(BIN)/python -m tests.fuzz.run --examples $(FUZZ_EXAMPLES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
