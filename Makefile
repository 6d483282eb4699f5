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
# Evidently's own environment: Evidently 0.7 needs pandas < 3 and plotly < 6, the project pandas 3 and plotly 7; the
# monitor stage runs deploy/evidently/report.py in it (a subprocess), and fmnist_lib never imports evidently
EV_VENV  := .venv-evidently
EV_STAMP := $(EV_VENV)/.fmnist-evidently
PROFILE ?= default

# Debian packages: the data (else fmnist downloads it from the official mirror), a real browser for the site
# test, and iproute2 (`ip`) for the Ray tests, which run in their own loopback-only network namespace.
DEB_DATA := dataset-fashion-mnist
# what pipeline stages run (so `make all` needs them too): hey, the load generator of the serve stage; Prometheus and
# Alertmanager, which the monitor stage starts on 127.0.0.1 (promtool/amtool also check deploy/prometheus/ in make test)
DEB_SERVE := hey prometheus prometheus-alertmanager
DEB_TEST := chromium chromium-driver iproute2 podman buildah runc debootstrap catatonit

.PHONY: help all setup evidently sysdeps sysdeps-test data pipeline book test lint test-nb test-py smoke nbval lab clean clean-models wheels base-image image

help:
	@echo "make all     set up, fetch and verify the data, run the $(PROFILE) profile, build the site"
	@echo "make test    set up and run every test: lint, notebooks, pytest, the smoke pipeline, nbval, the site in Chromium"
	@echo "make lab     open JupyterLab with the project's kernel"
	@echo "make book    rebuild the site from reports/$(PROFILE)/ (PROFILE=smoke|default|full)"
	@echo "make setup   only create $(VENV) and install fmnist_lib with its dev dependencies"
	@echo "make evidently  only create $(EV_VENV), the monitor stage's Evidently environment (deploy/evidently/requirements.txt)"
	@echo "make clean   remove generated reports, site and caches (keeps $(VENV), data/raw, the model store and searches)"
	@echo "make clean-models  remove the model store reports/models/ (every registered model and the champions)"
	@echo "make image   build the serving image $(IMAGE) with podman (deploy/Dockerfile; no torch in it)"

all: setup data pipeline book
	@echo "done: reports in reports/$(PROFILE)/, site at book/_build/html/index.html"

# --- set-up -------------------------------------------------------------------------------
$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fmnist)" >/dev/null
	@touch $@

setup: $(STAMP)

# about 1 GB and a minute from PyPI (measured: 63 s, cold cache); reinstalled only when the pinned requirements change
$(EV_STAMP): deploy/evidently/requirements.txt
	@test -x $(EV_VENV)/bin/python || $(PYTHON) -m venv $(EV_VENV)
	$(EV_VENV)/bin/python -m pip install --disable-pip-version-check -q -r deploy/evidently/requirements.txt
	@touch $@

evidently: $(EV_STAMP)

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
	$(call apt_ensure,$(DEB_SERVE),the serve and monitor stages fail until they are installed)
	@# the Debian packages enable system services where systemd runs; the monitor stage starts its own, on loopback
	@if command -v systemctl >/dev/null && [ "$$(id -u)" = 0 ]; then systemctl disable --now prometheus prometheus-alertmanager >/dev/null 2>&1 || true; fi

sysdeps-test: sysdeps
	$(call apt_ensure,$(DEB_TEST),the browser and Ray tests will fail until they are installed)

# --- data, pipeline, site -----------------------------------------------------------------
data: setup sysdeps
	$(BIN)/fmnist data fetch --quiet

pipeline: data evidently
	$(BIN)/fmnist run --profile $(PROFILE) --quiet

book: setup
	$(BIN)/fmnist book --profile $(PROFILE)

# --- tests --------------------------------------------------------------------------------
test: setup sysdeps-test data lint test-nb smoke test-py nbval

# pyflakes rules (unused imports and variables, undefined names) over the generated library and the tests;
# fix a finding in the notebook that exports the module, then run nbdev_export
lint: setup
	$(BIN)/ruff check --select F --no-cache fmnist_lib tests

# the library notebooks as tests: each runs in a fresh kernel, two at a time, and any failing cell (an inline test) fails;
# the executed copies are the site's library pages (book/library/), which the site build in test-py reuses instead of
# executing them a second time. `cd nbs && ../.venv/bin/nbdev_test` runs the same cells, for a quick loop while editing.
test-nb: setup
	$(BIN)/fmnist book --library-only

smoke: data evidently
	$(BIN)/fmnist run --profile smoke --quiet

# pytest-xdist: two workers, each test file on one worker (its module fixtures built once); many tests wait on servers,
# kernels and browsers, so two at a time finish sooner on 2 cores (measured: 468 s against 655 s serial). One torch thread
# per worker, or two trainings side by side would run 2 threads each on 2 cores and slow each other down. TEST_WORKERS=0
# runs them in one process, for a debugger or -x.
TEST_WORKERS ?= 2
test-py: setup evidently
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(BIN)/python -m pytest -rs --durations=25 \
	  $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

# nbval re-executes the executed smoke reports (training included: a finished run's checkpoint is
# never resumed) and compares their outputs with the committed sanitizers.
nbval: smoke
	$(BIN)/python -m pytest -p no:cacheprovider --nbval reports/smoke/[0-9]*.ipynb --nbval-sanitize-with tests/nbval_sanitize.cfg

# JupyterLab on 127.0.0.1 only; as root (containers, these machines) it needs --allow-root or it stops at once
# JupyterLab settings a newcomer wants (no news pop-up, the project kernel started by itself): .jupyter/overrides.json,
# installed into the venv where JupyterLab reads overrides. LAB_ARGS passes more options, e.g. LAB_ARGS=--port=8890.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
LAB_ARGS ?=
$(LAB_OVERRIDES): .jupyter/overrides.json $(STAMP)
	@mkdir -p $(@D) && cp $< $@

lab: setup $(LAB_OVERRIDES)
	$(BIN)/jupyter lab --notebook-dir=. --ip=127.0.0.1 --no-browser $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

# --- the serving image (deploy/) ----------------------------------------------------------
# podman and buildah come with DEB_TEST (catatonit is what `podman run --init` runs as PID 1). podman reads the
# project's containers.conf (runc instead of crun; open-file limits within the hard limit); the system's own
# files are never changed.
CONTAINERS_CONF := $(CURDIR)/deploy/podman/containers.conf
PODMAN       := CONTAINERS_CONF=$(CONTAINERS_CONF) podman
IMAGE        ?= localhost/fmnist-serve:latest
PY_BASE      := docker.io/library/python:3.11-slim
DEBIAN_BASE  := localhost/debian-base:bookworm
# BASE_IMAGE empty: $(PY_BASE) when a registry answers, else $(DEBIAN_BASE), built here by debootstrap
BASE_IMAGE   ?=
# The build never reaches an index: pip installs from $(WHEELS) only, filled here for the image's CPython
# and platform (both bases: Debian bookworm, glibc 2.36), whatever the host's own Python is.
WHEELS       := deploy/wheels
IMAGE_PYTHON := 3.11
WHEEL_PLATFORMS := $(foreach t,manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_36,--platform $(t)_$(shell uname -m))

# the serving requirements (deploy/requirements-serve.txt = settings.ini's serve_requirements), downloaded once
$(WHEELS)/.requirements: deploy/requirements-serve.txt | $(STAMP)
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/pip download -q --dest $(WHEELS) --only-binary=:all: --implementation cp --python-version $(IMAGE_PYTHON) \
	  $(WHEEL_PLATFORMS) -r deploy/requirements-serve.txt
	@touch $@

# fmnist_lib's own wheel, rebuilt whenever the library changes (build/ would keep deleted modules in it); pip
# builds it in isolation, so the venv needs no setuptools (Python >= 3.12 venvs have none)
$(WHEELS)/.fmnist_lib: $(WHEELS)/.requirements settings.ini setup.py README.md $(wildcard fmnist_lib/*.py)
	rm -rf build $(WHEELS)/fmnist_lib-*.whl
	$(BIN)/pip wheel -q --no-deps -w $(WHEELS) .
	@rm -rf build && touch $@

wheels: $(WHEELS)/.fmnist_lib

# localhost/debian-base:bookworm with python3 from the machine's own apt mirror (needs root); reused once built
base-image:
	deploy/base-image.sh $(DEBIAN_BASE)

# IMAGE=name:tag picks the tag, BASE_IMAGE=... the base (else chosen as above), BUILD_ARGS more podman build
# options (--layers=false keeps no cached layers); it builds with no network at all
BUILD_ARGS   ?=
image: wheels
	@base='$(BASE_IMAGE)'; \
	if [ -z "$$base" ]; then \
	  if $(PODMAN) image exists $(PY_BASE) || timeout 120 $(PODMAN) pull -q $(PY_BASE) >/dev/null 2>&1; then base=$(PY_BASE); \
	  else echo "no container registry answers: building on $(DEBIAN_BASE)"; deploy/base-image.sh $(DEBIAN_BASE); base=$(DEBIAN_BASE); fi; \
	fi; \
	echo "building $(IMAGE) on $$base"; \
	$(PODMAN) build --format docker --network none $(BUILD_ARGS) --build-arg BASE_IMAGE=$$base -f deploy/Dockerfile -t $(IMAGE) .

# `clean` removes what `make all` / `make test` rebuild: the profiles' reports, caches and the site. It keeps
# the model store (reports/models: every registered version and the champions) and the results of long
# searches and benchmarks (reports/sweeps, reports/tune, reports/bench); `clean-models` removes the store.
KEEP_REPORTS := models sweeps tune bench
clean:
	@if [ -d reports ]; then for d in reports/*/; do n=$$(basename "$$d"); \
	  case " $(KEEP_REPORTS) " in *" $$n "*) echo "kept $$d";; *) rm -rf "$$d";; esac; done; fi
	rm -rf data/processed book/_build book/reports book/library book/_generated book/sweeps _proc _docs .pytest_cache .ray .cache

clean-models:
	@echo "removing every registered model and the champions in reports/models/"
	rm -rf reports/models
