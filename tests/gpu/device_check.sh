#!/usr/bin/env bash
# Device check of the CUDA engine on a fresh GPU machine (no network needed), in under 8 minutes:
#
#   tests/gpu/device_check.sh [OUT_DIR]        (default: $OUT if set, else ./device_check_out)
#
#   1. environment   GPU, driver, Python, torch, nvcc, NVSHMEM wheel, compute-sanitizer, MPS binary
#   2. build         python build_core.py (when nvcc exists; otherwise a carried deep_ep/libdeep_ep_core.so
#                    is used as is, and the log says so)
#   3. GPU tests     tests/gpu/test_intranode_cuda.py: N = 2, 3, 4, 8 ranks on this GPU vs the portable
#                    engine, async events, CUDA-graph capture (pytest if installed, else script mode);
#                    tests/gpu/test_ll_cuda.py: low-latency kernels over peer memory (2, 4 ranks) and
#                    NVSHMEM (2 PEs on this GPU over P2P, IBGDA off) vs the portable engine
#   4. sanitizer     compute-sanitizer memcheck and racecheck on tests/gpu/sanitize_case.py, memcheck on
#                    tests/gpu/sanitize_ll_case.py (if found)
#   5. benchmark     tests/gpu/bench_intranode.py: dispatch/combine GB/s with 2, 4, 8 ranks + copy GB/s;
#                    tests/gpu/bench_ll.py: low-latency dispatch/combine and hook send/recv in us, 2, 4, 8 ranks
#   internode        tests/gpu/test_internode_cuda.py (virtual nodes 2x2, 2x4, 4x2, 4x1, 2x3 over peer
#                    memory, 2x2 over NVSHMEM with and without its load/store shortcut, on this GPU vs the
#                    portable engine, CUDA graph on 2x2),
#                    memcheck on tests/gpu/sanitize_internode_case.py,
#                    tests/gpu/bench_internode.py (dispatch/combine recv and RDMA GB/s per layout)
#
# DEVICE_CHECK_ONLY=intranode,ll,internode (default: all three) picks the groups of steps 3-5, so that
# one group fits a short device session with time left for a rerun.
# Every step runs under `timeout`; logs go to OUT_DIR/<step>.log, verdicts to OUT_DIR/summary.txt.
# Exit status: 0 all passed, 1 a step failed, 2 no GPU (the build still runs and is checked).
# Environment: PYTHON (default: python3), DEEP_EP_BUILD_JOBS, CUDA_HOME.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/device_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
SUMMARY="$OUT_DIR/summary.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 1
: > "$SUMMARY"
FAILED=0
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# The whole check stays under 8 minutes: every step's limit is cut to what is left of BUDGET_S, and a
# step with less than 20 s left is skipped (and counts as a failure).
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-470}

# step NAME LIMIT_S CMD...: run CMD under timeout, log to OUT_DIR/NAME.log, record the verdict.
step() {
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s) rc verdict
    local left=$(( BUDGET_S - (t0 - START) ))
    if [ $left -lt 20 ]; then
        note "$(printf '%-12s %-14s' "$name" "SKIPPED") time budget of ${BUDGET_S}s used up"
        FAILED=1
        return 1
    fi
    [ $limit -gt $left ] && limit=$left
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then verdict=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT(${limit}s)"; else verdict="FAIL(rc=$rc)"; fi
    [ "$verdict" = PASS ] || FAILED=1
    note "$(printf '%-12s %-14s %4ss  %s' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$OUT_DIR/$name.log")"
    tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY"
    return $rc
}

note "deep_ep device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)')"

# ---- 1. environment (never fails the check)
{
    echo "== nvidia-smi"; (command -v nvidia-smi >/dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv) || echo "nvidia-smi not found"
    echo "== python"; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())"
    echo "== nvcc"; (CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"; ls "$CUDA_HOME/bin/nvcc" 2>/dev/null && "$CUDA_HOME/bin/nvcc" --version | tail -2) || command -v nvcc || echo "nvcc not found"
    echo "== nvshmem"; "$PY" -c "import importlib.util as u; s=u.find_spec('nvidia.nvshmem'); print(list(s.submodule_search_locations) if s else 'no nvidia-nvshmem wheel')"
    echo "== pytest"; "$PY" -c "import pytest; print(pytest.__version__)" 2>&1 | tail -1
    echo "== compute-sanitizer"; command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || echo "not found"
    echo "== MPS"; command -v nvidia-cuda-mps-control || echo "nvidia-cuda-mps-control not found"
    echo "== cpus"; nproc
} > "$OUT_DIR/environment.log" 2>&1
note "environment  (see $OUT_DIR/environment.log)"
grep -A1 "== python" "$OUT_DIR/environment.log" | tail -1 | sed 's/^/    | /' | tee -a "$SUMMARY"

# ---- 2. build
NVCC=""
for cand in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc 2>/dev/null)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC="$cand"; break; fi
done
if [ -n "$NVCC" ]; then
    export CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
    step build 90 "$PY" build_core.py --jobs "${DEEP_EP_BUILD_JOBS:-$(nproc)}"
elif [ -f deep_ep/libdeep_ep_core.so ]; then
    note "build        SKIPPED        no nvcc here: using the carried deep_ep/libdeep_ep_core.so ($(stat -c %y deep_ep/libdeep_ep_core.so 2>/dev/null))"
else
    note "build        FAIL           no nvcc and no prebuilt deep_ep/libdeep_ep_core.so"
    FAILED=1
fi
step load 60 "$PY" -c "from deep_ep import _core; lib = _core.load(); assert lib is not None, _core.load_error(); print('core loaded:', _core.library_path(), _core.build_info().get('archs'), 'sm90' if lib.deep_ep_core_is_sm90() else 'sm80 build'); nv = _core.load_nvshmem(); print('nvshmem library:', _core.nvshmem_library_path() if nv is not None else _core.nvshmem_load_error())"

# ---- no GPU: stop cleanly here
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "gpu          SKIPPED        no CUDA device: GPU tests, sanitizer and benchmark not run"
    note "total $(( $(date +%s) - START ))s: $([ $FAILED -eq 0 ] && echo 'build OK, no GPU' || echo 'FAILED')"
    [ $FAILED -eq 0 ] && exit 2 || exit 1
fi

ONLY=",${DEVICE_CHECK_ONLY:-intranode,ll,internode},"
want() { case "$ONLY" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
note "groups       ${ONLY//,/ }"
gpu_test() {  # gpu_test NAME LIMIT FILE [pytest args]: pytest when installed, else the file's script mode
    local name="$1" limit="$2" file="$3"; shift 3
    if "$PY" -c "import pytest" 2>/dev/null; then
        step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider -rs "$@" "$file"
    else
        step "$name" "$limit" "$PY" "$file"
    fi
}

# ---- 3. GPU tests
want intranode && gpu_test gpu_tests 110 tests/gpu/test_intranode_cuda.py -x
want ll && gpu_test ll_tests 100 tests/gpu/test_ll_cuda.py
want internode && gpu_test internode_tests 220 tests/gpu/test_internode_cuda.py

# ---- 4. compute-sanitizer
SAN="$(command -v compute-sanitizer 2>/dev/null || true)"
[ -z "$SAN" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [ -n "$SAN" ]; then
    MEMCHECK=("$SAN" --tool memcheck --target-processes all --error-exitcode 1 "$PY")
    want intranode && step memcheck 45 "${MEMCHECK[@]}" tests/gpu/sanitize_case.py
    want intranode && step racecheck 45 "$SAN" --tool racecheck --target-processes all --error-exitcode 1 "$PY" tests/gpu/sanitize_case.py
    want ll && step ll_memcheck 40 "${MEMCHECK[@]}" tests/gpu/sanitize_ll_case.py
    want internode && step in_memcheck 90 "${MEMCHECK[@]}" tests/gpu/sanitize_internode_case.py
else
    note "sanitizer    SKIPPED        compute-sanitizer not found"
fi

# ---- 5. benchmark
want intranode && step bench 35 "$PY" tests/gpu/bench_intranode.py --ranks 2 4 8 --tokens 2048 --iters 3 --json "$OUT_DIR/bench.json"
want ll && step bench_ll 45 "$PY" tests/gpu/bench_ll.py --ranks 2 4 8 --tokens 128 --hidden 7168 --experts 64 --iters 10 \
    --json "$OUT_DIR/bench_ll.json"
want internode && step bench_internode 90 "$PY" tests/gpu/bench_internode.py --layouts 2x2 4x2 --tokens 512 \
    --iters 3 --json "$OUT_DIR/bench_internode.json"

note "total $(( $(date +%s) - START ))s: $([ $FAILED -eq 0 ] && echo 'ALL PASSED' || echo 'FAILED')"
exit $FAILED
