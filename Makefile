# dicom-node: `make run` starts the node, `make test` installs everything the
# tests need (Debian packages included) and runs the whole suite. Run as root on
# a fresh Debian machine with Python 3.11; both create the virtualenv in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Peers and validators the tests run for real.
DEBIAN_TEST_PACKAGES ?= dcmtk dicom3tools orthanc openssl
# `make run` allows DCMTK's default calling AE title so `storescu` works out of
# the box on loopback; the node's own default (no flag) denies every AE title.
RUN_ARGS ?= --allow-calling-ae STORESCU
PYTEST_ARGS ?=

.PHONY: run test demo demo-model install install-bench install-test debian-test-packages lint bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

debian-test-packages:
	@missing=""; for p in $(DEBIAN_TEST_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

run: install
	$(BIN)/dicom-node serve $(RUN_ARGS)

# Starts a PACS (Orthanc when installed), the node with MODEL (default: an
# untrained demo model), sends the sample DICOMs and prints the results.
MODEL ?=
demo: install
	$(BIN)/python deploy/demo.py $(if $(MODEL),--model $(MODEL))

# Trains the demo model from a folder of labelled images (the shared dev set by
# default) at 128 px, 2 phases of 2 epochs -- minutes on a CPU -- and installs it.
DATA ?= ../shared/data/cxr-dev
demo-model: install
	$(BIN)/dicom-node train --data $(DATA) --arch concatenated --input-size 128 \
	  --folds 5 --phases 2 --epochs-per-phase 2 --version 0.1.0-demo --out var/demo-training
	$(BIN)/dicom-node model install var/demo-training/fold1/model

lint: install-test
	$(BIN)/ruff check dicom_node model training tests bench
	$(BIN)/mypy

test: debian-test-packages lint
	$(BIN)/pytest $(PYTEST_ARGS)

install-bench: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'

bench: install-bench debian-test-packages
	$(BIN)/python bench/receive.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/train_input.py

bench-quick: install-bench debian-test-packages
	$(BIN)/python bench/receive.py --quick
	$(BIN)/python bench/inference.py --quick
	$(BIN)/python bench/e2e.py --quick
	$(BIN)/python bench/train_input.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
