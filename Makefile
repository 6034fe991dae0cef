# The two commands of the quick start: `make run` and `make test`.
# Both create .venv and install the project first; nothing else is needed by hand.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ACCOUNTS ?= 20

.PHONY: run test lint typecheck pytest bench clean venv audit

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "accountd needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,fast]'
	@touch $(STAMP)

# The demo: embedded SQLite under ./var/demo, the built-in worker simulator, demo accounts.
run: $(STAMP)
	$(BIN)/accountd demo --accounts $(ACCOUNTS)

lint: $(STAMP)
	$(BIN)/ruff check accountd tests bench
	$(BIN)/ruff format --check accountd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Two worker processes (pytest-xdist): the suite mostly waits on real processes, sockets and
# timers. In one process it kept a 2-CPU machine 42 % busy and took 15 minutes there; in two,
# 7.5 minutes (docs/benchmarks.md). `make test PYTEST_ARGS=` runs it in one process.
PYTEST_ARGS ?= -n 2

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Lint, types and the whole suite. MariaDB tests run when ACCOUNTD_TEST_MYSQL_URL is set
# (e.g. mysql+aiomysql://root@127.0.0.1:3306/); without it they skip and say why.
test: lint typecheck pytest

# Known vulnerabilities in the locked dependencies (what .venv holds), with pip-audit from the
# test extra. Needs PyPI's JSON API; when it cannot be reached the packages are reported as NOT
# checked and the exit status stays 0 (AUDIT_STRICT=1 makes that fail). See .ci/audit.py.
audit: $(STAMP)
	$(BIN)/python .ci/audit.py

clean:
	rm -rf $(VENV) var build *.egg-info .mypy_cache .ruff_cache .pytest_cache
