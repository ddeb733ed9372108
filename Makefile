# kiban: `make run` starts the sample system, `make test` runs the whole suite.
# Both bootstrap a virtualenv with the locked dependencies (uv.lock) on a fresh machine.

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bootstrap clean bench

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen --quiet
	touch $@

bootstrap: $(VENV)/.synced

run: bootstrap
	$(PY) -m services.run

test: bootstrap lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check src tests services bench
	$(VENV)/bin/ruff format --check src tests services bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .pytest_cache .ruff_cache

bench: bootstrap
	$(PY) -m bench.run $(BENCH_ARGS)
