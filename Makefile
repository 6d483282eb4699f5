# fmnist: `make all` sets up and runs the main job, `make test` sets up and runs every test.
# Every target bootstraps what it needs and is idempotent: a second run reinstalls nothing
# unless settings.ini or setup.py changed.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fmnist-setup
PROFILE ?= default

# Debian packages: the data (else fmnist downloads it from the official mirror).
DEB_DATA := dataset-fashion-mnist

.PHONY: help all setup sysdeps data report test test-nb test-py lab clean

help:
	@echo "make all     set up, fetch and verify the data, run the pipeline (profile $(PROFILE))"
	@echo "make test    set up and run every test (nbdev notebook tests + pytest)"
	@echo "make lab     open JupyterLab with the project's kernel"
	@echo "make setup   only create $(VENV) and install fmnist_lib with its dev dependencies"
	@echo "make clean   remove generated reports and caches (keeps $(VENV) and data/raw)"

all: setup data report
	@echo "done: reports in reports/$(PROFILE)/"

# --- set-up -------------------------------------------------------------------------------
$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fmnist)" >/dev/null
	@touch $@

setup: $(STAMP)

# Install missing Debian packages when we can (root + apt); otherwise say what is missing.
# $(1): packages, $(2): what happens without them.
define apt_ensure
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "note: Debian packages$$missing are missing and need root + apt to install; $(2)"; fi; \
	fi
endef

sysdeps:
	$(call apt_ensure,$(DEB_DATA),fmnist downloads the data from the official mirror instead)

# --- data and pipeline --------------------------------------------------------------------
data: setup sysdeps
	$(BIN)/fmnist data fetch --quiet

report: data
	@mkdir -p reports/$(PROFILE)
	$(BIN)/papermill --log-level WARNING nbs/experiments/01_data_report.ipynb reports/$(PROFILE)/01_data_report.ipynb -p profile $(PROFILE)
	@echo "data report: reports/$(PROFILE)/01_data_report.ipynb and reports/$(PROFILE)/data_report.json"

# --- tests --------------------------------------------------------------------------------
test: setup data test-nb test-py

test-nb: setup
	cd nbs && ../$(BIN)/nbdev_test

test-py: setup
	$(BIN)/python -m pytest tests

lab: setup
	$(BIN)/jupyter lab --notebook-dir=.

clean:
	rm -rf reports/*/ data/processed _proc _docs .pytest_cache
