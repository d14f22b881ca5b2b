# Grid-X — `make demo` brings the local lab up and runs a job on it;
# `make test` runs the unit tests and, when Docker can run, the end-to-end
# tests on the lab. Both install what they need when it is missing.

PYTHON ?= python3
SHELL := /bin/bash

.PHONY: help demo test unit e2e lint binary bench clean deps lab-deps

help:
	@echo "make demo    bring up the lab (1 hub + 3 workers) and run a job on it"
	@echo "make test    unit tests, then end-to-end tests on the lab when Docker can run"
	@echo "make lint    ruff + shellcheck"
	@echo "make binary  build dist/gridx, one static file (PyInstaller + staticx)"
	@echo "make bench   measure Grid-X against the raw tools (needs the lab)"
	@echo "make clean   remove the lab and build outputs"

# Test-only tools (pytest, ruff) and the lab's host packages.
deps:
	@scripts/install-deps.sh test

lab-deps:
	@scripts/install-deps.sh lab

demo: lab-deps
	./test.sh start
	./test.sh setup
	./test.sh test-job
	@echo
	@echo "Next: ./test.sh status · ./test.sh cluster · ./test.sh ssh worker2 hostname · ./test.sh test-gpu"
	@echo "      ./test.sh add-external laptop · ./test.sh clean"

unit: deps
	$(PYTHON) -m pytest -q -m "not e2e" tests

e2e: lab-deps
	$(PYTHON) -m pytest -q -m e2e tests/e2e

test: deps
	@if scripts/install-deps.sh lab >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
		$(PYTHON) -m pytest -q tests; \
	else \
		echo "warning: Docker cannot run here: running the unit tests only" >&2; \
		$(PYTHON) -m pytest -q -m "not e2e" tests; \
	fi

lint: deps
	$(PYTHON) -m ruff check gridx.py tests packaging
	shellcheck -S style bundle_templates/*.sh test.sh lab/*.sh scripts/*.sh packaging/*.sh .ci/run

binary:
	packaging/build.sh

bench: lab-deps
	$(PYTHON) tests/bench.py

clean:
	./test.sh clean || true
	rm -rf build dist .venv-build
