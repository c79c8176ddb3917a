# dicom-node: `make run` starts the node, `make test` installs everything the
# tests need (Debian packages included) and runs the whole suite. Run as root on
# a fresh Debian machine with Python 3.11; both create the virtualenv in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Peers and validators the tests run for real.
# yq reads deploy/compose.yaml for tests/test_deploy.py (YAML to JSON; no Python YAML
# library in the locks).
# postgresql: a real server for the scale-out tests (tests/helpers/postgres.py starts a
# throwaway cluster of its own from the binaries; Debian's default cluster is not used).
DEBIAN_TEST_PACKAGES ?= dcmtk dicom3tools orthanc orthanc-dicomweb openssl yq postgresql
# `make run` allows DCMTK's default calling AE title so `storescu` works out of
# the box on loopback; the node's own default (no flag) denies every AE title.
RUN_ARGS ?= --allow-calling-ae STORESCU
PYTEST_ARGS ?=

.PHONY: run test test-long demo demo-model install install-bench install-gpu install-test lock debian-test-packages lint bench bench-quick clean

# Exact versions with hashes, made by pip-tools from the ranges in pyproject.toml:
# LOCK for the node (`make run`: no extras), TEST_LOCK for `make test` (extras test and
# training). To upgrade: `make lock`, review the diff of deploy/*.lock, `make test`, commit.
# After editing pyproject.toml without upgrading the rest: `make lock LOCK_ARGS=`; one
# package: `make lock LOCK_ARGS='--upgrade-package numpy'`. The locks are for CPython 3.11
# on Linux (the machines and deploy/Dockerfile); run `make lock` with that Python.
# GPU_LOCK is the node's lock for deploy/Dockerfile.gpu: the same pins, with TensorFlow's
# CUDA build and its NVIDIA wheels (extra gpu) in place of tensorflow-cpu. Both builds
# install the module `tensorflow`, so one environment must never hold both: tensorflow-cpu
# is declared "unsafe" there, which pip-compile leaves out (it lists it in a closing
# comment); only dicom-node itself asks for it, and the image installs that --no-deps.
LOCK := deploy/requirements.lock
TEST_LOCK := deploy/requirements-test.lock
GPU_LOCK := deploy/requirements-gpu.lock
LOCK_ARGS ?= --upgrade
LOCK_TOOLS := pip==26.3 pip-tools==7.6.2
PIP_COMPILE_HASHED := pip-compile --quiet --generate-hashes --strip-extras \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host
PIP_COMPILE := $(PIP_COMPILE_HASHED) --allow-unsafe

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip

# Dependencies from the lock (every file checked against its hash), then the project
# itself without resolving anything more.
install: $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .

# The node on an NVIDIA GPU: its lock, then TensorFlow's CUDA build of the same version in
# place of tensorflow-cpu (both install the module `tensorflow`), and nvidia-ml-py (the
# `gpu` extra); the CUDA build is reinstalled last, as a rerun of `install` puts the CPU
# build's files back. Needs PyPI, or WHEELS=/folder/of/wheels for a machine without network.
install-gpu: install
	tf=$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("tensorflow-cpu"))' \
	  2>/dev/null || $(BIN)/python -c 'import importlib.metadata as m; print(m.version("tensorflow"))') && \
	$(BIN)/pip uninstall --quiet -y tensorflow-cpu && \
	$(BIN)/pip install --quiet $(if $(WHEELS),--no-index --find-links $(WHEELS)) \
	  "tensorflow[and-cuda]==$$tf" "nvidia-ml-py>=13.615,<14" && \
	$(BIN)/pip install --quiet --force-reinstall --no-deps \
	  $(if $(WHEELS),--no-index --find-links $(WHEELS)) "tensorflow==$$tf"

install-test: $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r $(TEST_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .

# Regenerates the three locks in a throwaway virtualenv (pip-tools never enters .venv).
# The node's lock is resolved within the test lock and the GPU lock within the node's, so
# all pin the same versions (tests/test_deploy.py checks the GPU lock against the node's).
lock:
	tools=$$(mktemp -d) && trap 'rm -rf "$$tools"' EXIT && \
	$(PYTHON) -m venv "$$tools" && \
	"$$tools/bin/pip" install --quiet $(LOCK_TOOLS) && \
	export CUSTOM_COMPILE_COMMAND='make lock' && \
	"$$tools/bin/"$(PIP_COMPILE) $(LOCK_ARGS) --extra test --extra training \
	  --output-file $(TEST_LOCK) pyproject.toml && \
	"$$tools/bin/"$(PIP_COMPILE) $(LOCK_ARGS) --constraint $(TEST_LOCK) \
	  --output-file $(LOCK) pyproject.toml && \
	"$$tools/bin/"$(PIP_COMPILE_HASHED) $(LOCK_ARGS) --unsafe-package tensorflow-cpu \
	  --extra gpu --constraint $(LOCK) --output-file $(GPU_LOCK) pyproject.toml

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
# default) at 128 px from random weights (no ImageNet files needed), 2 phases of 2
# epochs -- minutes on a CPU -- and installs it.
# Training needs the `training` extra, which the test lock holds.
DATA ?= ../shared/data/cxr-dev
demo-model: install-test
	$(BIN)/dicom-node train --data $(DATA) --arch concatenated --input-size 128 --weights none \
	  --folds 5 --phases 2 --epochs-per-phase 2 --version 0.1.0-demo --out var/demo-training
	$(BIN)/dicom-node model install --allow-unvalidated var/demo-training/fold1/model

lint: install-test
	$(BIN)/ruff check dicom_node model training tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint --no-color deploy/Dockerfile deploy/Dockerfile.gpu

test: debian-test-packages lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The long training variants `make test` leaves out (marker `long`, minutes each).
test-long: debian-test-packages install-test
	$(BIN)/pytest -m long $(PYTEST_ARGS)

# The test lock, then the `bench` extra on top of it, unlocked (pip keeps the locked
# versions where they satisfy the extra and resolves only what is missing).
install-bench: install-test
	$(BIN)/pip install --quiet -e '.[test,training,bench]'

bench: install-bench debian-test-packages
	$(BIN)/python bench/receive.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/train_input.py

bench-quick: install-bench debian-test-packages
	$(BIN)/python bench/receive.py --quick
	$(BIN)/python bench/load.py --quick
	$(BIN)/python bench/inference.py --quick
	$(BIN)/python bench/e2e.py --quick
	$(BIN)/python bench/train_input.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
