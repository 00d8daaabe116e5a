# deep_ep developer entry points. The README's Quick start is exactly:
#
#     make bench    # verify and time dispatch/combine on 4 local ranks, next to two baselines
#     make test     # builds the compiled libraries when nvcc is found, then the test suite (pytest)
#
# Each one first sets up .venv by itself (`make setup`): it creates the venv with python3 if it
# is missing, installs requirements-dev.txt and installs deep_ep in editable mode. The install is
# skipped when the stamp file for the current requirements-dev.txt + setup.py + pyproject.toml
# exists, so repeated runs start at once.
#
# Knobs: PYTHON=python3.12 (interpreter for a new venv), VENV=path (another venv),
#        TORCH_INDEX=https://download.pytorch.org/whl/cpu (install torch from that index first, e.g.
#        the CPU-only wheel instead of the CUDA build),
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
TORCH_INDEX ?=
SETUP_KEY := $(shell (cat $(SETUP_INPUTS); echo "$(TORCH_INDEX)") 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deep_ep-setup-$(SETUP_KEY)

BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup core bindings emu bench test test-all run clean-venv

# The CUDA core (csrc/ -> deep_ep/libdeep_ep_core.so, libdeep_ep_nvshmem.so): rebuilt whenever csrc/
# or build_core.py changes, when nvcc is found (CUDA_HOME, default /usr/local/cuda) unless
# DEEP_EP_BUILD_CUDA=0. The build prints ptxas' register/spill report and fails on a compile error, a
# spilling kernel, or NVSHMEM missing (DEEP_EP_DISABLE_NVSHMEM=1 builds without libdeep_ep_nvshmem.so).
# The pybind11 modules (csrc/python/ -> deep_ep/_core_binding*.so, _nvshmem_binding*.so) are
# rebuilt by ninja when their sources or the headers change, whenever a compiled core is present.
CORE := deep_ep/libdeep_ep_core.so
CORE_SRCS := build_core.py $(shell find csrc -path csrc/python -prune -o -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) -print 2>/dev/null)
export CUDA_HOME ?= /usr/local/cuda

help:
	@echo "make bench   - set up .venv if needed, run benchmarks/bench_ep.py (BENCH_ARGS=...), write"
	@echo "               benchmarks/results/cpu_bench_ep.* and docs/performance.md"
	@echo "make test    - set up .venv if needed, build the CUDA core if nvcc is found and the emulated core"
	@echo "               (make core, make emu), run the test suite"
	@echo "               (pytest -m 'not slow'; then the data-moving tests again over gloo; PYTEST_ARGS=...)"
	@echo "make test-all - the whole suite once, slow tests included (no gloo pass)"
	@echo "make core    - build the CUDA core (csrc/) when nvcc is found, and its pybind11 modules"
	@echo "make emu     - build the emulated core (csrc/ on the CPU, build_emu.py) and the pybind11 modules"
	@echo "make run SCRIPT=my.py ARGS=... - run your own script with .venv's python and this checkout"
	@echo "make setup   - only set up .venv"
	@echo "make clean-venv - delete .venv"

setup: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(VENV_PY)
	$(if $(TORCH_INDEX),$(VENV_PY) -m pip install --index-url $(TORCH_INDEX) "$$(grep -E '^torch[=<>]' $(REQS))")
	$(VENV_PY) -m pip install -r $(REQS)
	DEEP_EP_BUILD_CUDA=0 $(VENV_PY) -m pip install --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.deep_ep-setup-*
	touch $@

core: setup
	@if $(VENV_PY) -c "import build_core, sys; sys.exit(0 if build_core.should_build_core()[0] else 3)"; then \
	    $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) $(CORE); \
	else rc=$$?; [ $$rc -eq 3 ] || exit $$rc; echo "deep_ep: CUDA core not built (no nvcc, or DEEP_EP_BUILD_CUDA=0)"; fi
	@$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) bindings

$(CORE): $(CORE_SRCS)
	$(VENV_PY) build_core.py

# ninja (inside build_core.py) decides what is stale. The binding needs only the headers and g++, so
# it is built whenever a core exists: the CUDA one, DEEP_EP_CORE_LIB, or the emulated one (make emu).
bindings: setup
	@if [ -f $(CORE) ] || [ -n "$$DEEP_EP_CORE_LIB" ] || [ -f build/emu/plain/libdeep_ep_core.so ]; then \
	    $(VENV_PY) build_core.py --bindings-only; fi

# The emulated core (csrc/ compiled with g++ against the kernel emulator csrc/emu/, no nvcc or GPU):
# build/emu/plain/libdeep_ep_core.so, incremental; tests/test_emulated.py runs the kernels with it.
emu: setup
	$(VENV_PY) build_emu.py --jobs 2
	@$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) bindings

# Writes benchmarks/results/cpu_bench_ep.{json,txt} (with the commit measured) and regenerates
# docs/performance.md from the results there.
bench: setup
	$(VENV_PY) benchmarks/bench_ep.py --results benchmarks/results --markdown docs/performance.md --readme README.md $(BENCH_ARGS)

# The default run moves CPU tensors over the same-host shared-memory transport; the tests whose data
# moves between ranks then run again with gloo forced (test_faults and test_shm cover both by themselves).
GLOO_TESTS := tests/test_normal.py tests/test_low_latency.py tests/test_moe.py tests/test_pressure.py \
	tests/test_agreement.py tests/test_threads.py tests/test_megatron_calls.py

test: setup core emu
	$(VENV_PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)
	@echo "== again over gloo (DEEP_EP_TRANSPORT=gloo): $(GLOO_TESTS)"
	DEEP_EP_TRANSPORT=gloo $(VENV_PY) -m pytest -q -m "not slow" $(GLOO_TESTS) $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: setup core emu
	$(VENV_PY) -m pytest -q tests $(PYTEST_ARGS)

# Your own script with this checkout's deep_ep (PYTHONPATH) and .venv's torch: make run SCRIPT=moe_example.py
run: setup
	@[ -n "$(SCRIPT)" ] || { echo "usage: make run SCRIPT=path/to/script.py [ARGS='...']"; exit 2; }
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(VENV_PY) $(SCRIPT) $(ARGS)

clean-venv:
	rm -rf $(VENV)
