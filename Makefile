# kiban: `make run` starts the sample system, `make test` runs the whole suite.
# Both bootstrap a virtualenv with the locked dependencies (uv.lock) on a fresh machine.

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bootstrap clean bench test-lock test-lowest test-newest

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen --quiet
	touch $@

bootstrap: $(VENV)/.synced

run: bootstrap
	$(PY) -m services.run

# The suite runs on the lock, then on the lowest versions pyproject.toml allows (its
# minimums are tested, not guessed) and on the newest it allows (its upper bounds too).
# Those two run side by side: the suite waits on processes and timeouts half the time.
test: lint test-lock
	$(MAKE) --no-print-directory -j2 --output-sync=target test-lowest test-newest

test-lock: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

.venv-%/.synced: $(UV) pyproject.toml | bootstrap
	rm -rf .venv-$*
	$(UV) venv --quiet --python $(PY) .venv-$*
	$(UV) pip install --quiet --python .venv-$*/bin/python \
		$(if $(filter lowest,$*),--resolution lowest-direct,--upgrade) -e '.[all]' --group dev
	touch $@

test-lowest test-newest: test-%: .venv-%/.synced
	# Old releases may leave a socket to the garbage collector after a loop closed:
	# reported, not fatal, here; the lock run keeps it an error. The package's own
	# tests exercise every library kiban integrates and run on all three. The adoption
	# test builds the wheel and installs it in venvs of its own, whatever this run's
	# versions; the template's and the sample system's tests are of kiban's users, on
	# the same integration points: those run once, on the lock.
	.venv-$*/bin/python -m pytest -p no:cacheprovider -W default::pytest.PytestUnraisableExceptionWarning \
		--ignore=tests/test_adoption.py --ignore=tests/test_template.py --ignore=tests/services \
		$(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check src tests services bench
	$(VENV)/bin/ruff format --check src tests services bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .venv-lowest .venv-newest $(TOOLS) .mypy_cache .pytest_cache .ruff_cache

bench: bootstrap
	$(PY) -m bench.run $(BENCH_ARGS)
