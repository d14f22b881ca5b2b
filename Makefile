# Grid-X — `make demo` brings the local lab up and runs a job on it;
# `make test` runs every test: the unit tests (the static binary's too: it
# builds dist/gridx when missing or older than its sources) and, when Docker
# can run, the end-to-end tests on a lab of each Debian suite of LAB_SUITES,
# one after the other. Both install what they need when it is missing.
#
#   LAB_SUITES=bookworm make test     one suite only
#   E2E_PARALLEL=0 make test          the suites one after the other, on one lab
#                                     (default: side by side, a lab each)
#   E2E=required make test            fail (not just warn) when Docker cannot
#                                     run the end-to-end tests (.ci/run)
#   GRIDX_LAB_SUITE=forky make e2e    the end-to-end tests on one suite
#   GRIDX_LAB_NAME, GRIDX_LAB_NET     which lab (see test.sh)

PYTHON ?= python3
SHELL := /bin/bash
# Debian suites the end-to-end tests run on: forky (Debian testing, Docker
# 28.5) and trixie (Docker 26.1) first, so the lab left running afterwards is
# the default bookworm (Docker 20.10) one.
LAB_SUITES ?= forky trixie bookworm
E2E ?= auto
# The suites' end-to-end runs side by side (1) or one after the other (0).
E2E_PARALLEL ?= 1
# What dist/gridx is built from (packaging/gridx.spec packs bundle_templates'
# files but its dotfiles).
BINARY_SOURCES := gridx.py $(wildcard bundle_templates/*) $(wildcard packaging/*)

.PHONY: help demo test unit e2e e2e-suites lint binary bench clean deps lab-deps

help:
	@echo "make demo    bring up the lab (1 hub + 3 workers) and run a job on it"
	@echo "make test    every test: unit (and dist/gridx's, built when stale), then end-to-end"
	@echo "             on a Debian testing (forky), a Debian 13 and a Debian 12 lab when Docker can run"
	@echo "make e2e     end-to-end tests on one lab (GRIDX_LAB_SUITE=bookworm|trixie|forky)"
	@echo "make lint    ruff + shellcheck"
	@echo "make binary  build dist/gridx, one static file (PyInstaller + staticx)"
	@echo "make bench   measure Grid-X against the raw tools (needs the lab)"
	@echo "make clean   remove the lab and build outputs"

# Test-only tools (pytest, ruff) and the lab's host packages.
deps:
	@scripts/install-deps.sh test

lab-deps:
	@scripts/install-deps.sh lab

# Timed from the packages on: on a fresh machine the installs, debootstrap
# and the image builds are most of it (test.sh prints each stage's time).
# debootstrap (when no base image is here) runs while Docker and the rest
# install: both mostly wait on the mirror and the disk.
demo:
	@set -e; start=$$SECONDS; step() { echo "[#] $$*"; "$$@"; }; \
	step scripts/install-deps.sh debootstrap; \
	./test.sh rootfs & rootfs=$$!; \
	step scripts/install-deps.sh lab; \
	wait $$rootfs || { echo "make demo: ./test.sh rootfs failed" >&2; exit 1; }; deps=$$SECONDS; \
	step ./test.sh start; started=$$SECONDS; \
	step ./test.sh setup; setup=$$SECONDS; \
	step ./test.sh test-job; \
	echo "make demo: $$((SECONDS - start)) s (packages and debootstrap $$((deps - start)) s, start $$((started - deps)) s," \
		"setup $$((setup - started)) s, test-job $$((SECONDS - setup)) s)"
	@echo
	@echo "Next: ./test.sh status · ./test.sh cluster · ./test.sh ssh worker2 hostname · ./test.sh test-gpu"
	@echo "      ./test.sh add-external laptop · ./test.sh clean"

# Six pytest runs side by side (scripts/unit-tests.sh; UNIT_PARALLEL=0: one).
unit: deps
	PYTHON=$(PYTHON) scripts/unit-tests.sh

# pytest's exit status fails the target, 5 (no test collected) included; the
# lab fixture fails rather than skips when Docker cannot run.
e2e: lab-deps
	GRIDX_E2E_REQUIRED=1 $(PYTHON) -m pytest -q -rs -m e2e tests/e2e

# A lab of each suite, timed (scripts/e2e-suites.sh): side by side unless
# E2E_PARALLEL=0 (then one after the other on one lab, as before); the last
# suite's lab is GRIDX_LAB_NAME's and stays, the others' go once they pass.
e2e-suites: lab-deps
	@[ -n "$(strip $(LAB_SUITES))" ] || { echo "error: LAB_SUITES is empty: no end-to-end tests would run" >&2; exit 2; }
	PYTHON=$(PYTHON) E2E_PARALLEL=$(E2E_PARALLEL) scripts/e2e-suites.sh $(LAB_SUITES)

dist/gridx: $(BINARY_SOURCES)
	packaging/build.sh

# With Docker, the unit tests run while the labs start (E2E_BESIDE).
test: deps dist/gridx
	@if scripts/install-deps.sh lab >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
		E2E_BESIDE="PYTHON=$(PYTHON) scripts/unit-tests.sh" $(MAKE) --no-print-directory e2e-suites; \
	elif [ "$(E2E)" = required ]; then \
		PYTHON=$(PYTHON) scripts/unit-tests.sh || exit 1; \
		echo "error: Docker cannot run here, and E2E=required: the end-to-end tests must run" >&2; \
		exit 1; \
	else \
		PYTHON=$(PYTHON) scripts/unit-tests.sh || exit 1; \
		echo "warning: Docker cannot run here: the end-to-end tests did not run (unit tests only)" >&2; \
	fi

lint: deps
	$(PYTHON) -m ruff check gridx.py tests packaging
	shellcheck -S style bundle_templates/*.sh test.sh lab/*.sh scripts/*.sh packaging/*.sh tests/bench/*.sh tests/engine_api/*.sh .ci/run

binary:
	packaging/build.sh

bench: lab-deps
	$(PYTHON) tests/bench.py

clean:
	./test.sh clean || true
	rm -rf build dist .venv-build
