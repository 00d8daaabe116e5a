# deep_ep developer entry points. The README's Quick start is exactly:
#
#     make bench      # the main job: spawn local ranks, verify and time dispatch/combine vs baselines
#     make test       # builds the CUDA core when nvcc is found, then the test suite
#
# Each one first sets up .venv by itself (`make setup`): it creates the venv with python3 if it
# is missing, installs requirements-dev.txt and installs deep_ep in editable mode. The install is
# skipped when the stamp file for the current requirements-dev.txt + setup.py + pyproject.toml
# exists, so repeated runs start at once.
#
# Knobs: PYTHON=python3.12 (interpreter for a new venv), VENV=path (another venv),
#        BENCH_ARGS="--num-ranks 8" (extra args for benchmarks/bench_ep.py),
#        PYTEST_ARGS="-x -k mpi" (extra args for pytest).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
REQS := requirements-dev.txt
SETUP_INPUTS := $(REQS) setup.py pyproject.toml
# The stamp's name carries a hash of the set-up inputs: editing any of them re-runs the install.
SETUP_KEY := $(shell cat $(SETUP_INPUTS) 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deep_ep-setup-$(SETUP_KEY)

BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup core bench test test-all clean-venv

# The CUDA core (csrc/ -> deep_ep/libdeep_ep_core.so): rebuilt whenever csrc/ or build_core.py
# changes, when nvcc is found (CUDA_HOME, default /usr/local/cuda) unless DEEP_EP_BUILD_CUDA=0.
# The build prints ptxas' register/spill report and fails on a compile error or a spilling kernel.
CORE := deep_ep/libdeep_ep_core.so
CORE_SRCS := build_core.py $(shell find csrc -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) 2>/dev/null)
export CUDA_HOME ?= /usr/local/cuda

help:
	@echo "make bench   - set up .venv if needed, run benchmarks/bench_ep.py (BENCH_ARGS=...), write"
	@echo "               benchmarks/results/cpu_bench_ep.* and docs/performance.md"
	@echo "make test    - set up .venv if needed, build the CUDA core if nvcc is found, run the test suite"
	@echo "               (pytest -m 'not slow'; PYTEST_ARGS=...)"
	@echo "make test-all - the same plus the slow random sweeps"
	@echo "make core    - build the CUDA core (csrc/) when nvcc is found"
	@echo "make setup   - only set up .venv"
	@echo "make clean-venv - delete .venv"

setup: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(VENV_PY)
	$(VENV_PY) -m pip install -r $(REQS)
	DEEP_EP_BUILD_CUDA=0 $(VENV_PY) -m pip install --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.deep_ep-setup-*
	touch $@

core: setup
	@if $(VENV_PY) -c "import build_core, sys; sys.exit(0 if build_core.should_build_core()[0] else 3)"; then \
	    $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) $(CORE); \
	else rc=$$?; [ $$rc -eq 3 ] || exit $$rc; echo "deep_ep: CUDA core not built (no nvcc, or DEEP_EP_BUILD_CUDA=0)"; fi

$(CORE): $(CORE_SRCS)
	$(VENV_PY) build_core.py

# Writes benchmarks/results/cpu_bench_ep.{json,txt} (with the commit measured) and regenerates
# docs/performance.md from the results there.
bench: setup
	$(VENV_PY) benchmarks/bench_ep.py --results benchmarks/results --markdown docs/performance.md $(BENCH_ARGS)

test: setup core
	$(VENV_PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

test-all: setup core
	$(VENV_PY) -m pytest -q tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
