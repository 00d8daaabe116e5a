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
# Time budget (tests/gpu/check_budget.py, which writes the arithmetic down): every step's limit is
# computed from a cost model (processes started, ranks time-sliced on the GPU, cases, NVSHMEM inits,
# sanitizer slowdown) times 1.5, the steps run most informative first, and a step starts only if its
# whole limit fits in what is left of the 8 minutes: otherwise it is NOT RUN (never cut short and then
# reported as a TIMEOUT). The summary lists the steps that ran and those that did not, with the
# DEVICE_CHECK_ONLY value that runs the rest. `python tests/gpu/check_budget.py explain` prints the plan.
#
# DEVICE_CHECK_ONLY=intranode,ll,internode and/or step names (default: every step) picks the steps of
# 3-5, so that a group fits a short device session with time left for a rerun.
# DEVICE_CHECK_PLAN_ONLY=1 prints the plan (steps, limits, what is expected to run) and exits 0.
# Every step runs under `timeout`; logs go to OUT_DIR/<step>.log, verdicts to OUT_DIR/summary.txt.
# Exit status: 0 all that ran passed, 1 a step failed, 2 no GPU (the build still runs and is checked).
# Environment: PYTHON (default: python3), DEEP_EP_BUILD_JOBS, CUDA_HOME, DEVICE_CHECK_BUDGET_S (470).
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

# The plan: "name group limit_s" per step, in run order (tests/gpu/check_budget.py).
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-470}
PLAN="$("$PY" tests/gpu/check_budget.py plan --only "${DEVICE_CHECK_ONLY:-}")" || { echo "bad DEVICE_CHECK_ONLY" >&2; exit 1; }
if [ -n "${DEVICE_CHECK_PLAN_ONLY:-}" ]; then
    "$PY" tests/gpu/check_budget.py explain --only "${DEVICE_CHECK_ONLY:-}" --budget "$BUDGET_S"
    exit 0
fi
RAN=""
NOT_RUN=""

# step NAME CMD...: run CMD under the step's planned limit if the whole limit fits in what is left of
# BUDGET_S (else NOT RUN); log to OUT_DIR/NAME.log, record the verdict. Steps not in the plan (not
# selected by DEVICE_CHECK_ONLY) are passed over silently.
step() {
    local name="$1"; shift
    local limit
    limit="$(echo "$PLAN" | awk -v n="$name" '$1 == n { print $3 }')"
    [ -n "$limit" ] || return 0
    local t0=$(date +%s) rc verdict
    local left=$(( BUDGET_S - (t0 - START) ))
    if [ "$limit" -gt "$left" ]; then
        note "$(printf '%-17s %-14s' "$name" "NOT RUN") needs its ${limit}s limit, ${left}s of the ${BUDGET_S}s budget left"
        NOT_RUN="$NOT_RUN $name"
        return 0
    fi
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then verdict=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT(${limit}s)"; else verdict="FAIL(rc=$rc)"; fi
    [ "$verdict" = PASS ] || FAILED=1
    RAN="$RAN $name"
    note "$(printf '%-17s %-14s %4ss  %s' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$OUT_DIR/$name.log")"
    tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY"
    return $rc
}

summary_end() {  # summary_end VERDICT: which steps ran, which did not and how to run them
    note "ran:    ${RAN:- none}"
    if [ -n "$NOT_RUN" ]; then
        local rest
        rest="$(echo $NOT_RUN | tr ' ' ',')"
        note "not run (over the ${BUDGET_S}s budget):$NOT_RUN; run them with DEVICE_CHECK_ONLY=$rest $0"
    fi
    note "total $(( $(date +%s) - START ))s: $1"
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
    step build "$PY" build_core.py --jobs "${DEEP_EP_BUILD_JOBS:-$(nproc)}"
elif [ -f deep_ep/libdeep_ep_core.so ]; then
    note "build        SKIPPED        no nvcc here: using the carried deep_ep/libdeep_ep_core.so ($(stat -c %y deep_ep/libdeep_ep_core.so 2>/dev/null))"
else
    note "build        FAIL           no nvcc and no prebuilt deep_ep/libdeep_ep_core.so"
    FAILED=1
fi
step load "$PY" -c "from deep_ep import _core; lib = _core.load(); assert lib is not None, _core.load_error(); print('core loaded:', _core.library_path(), _core.build_info().get('archs'), 'sm90' if lib.is_sm90() else 'sm80 build'); nv = _core.load_nvshmem(); print('nvshmem library:', _core.nvshmem_library_path() if nv is not None else _core.nvshmem_load_error())"

# ---- no GPU: stop cleanly here
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "gpu          SKIPPED        no CUDA device: GPU tests, sanitizer and benchmark not run"
    summary_end "$([ $FAILED -eq 0 ] && echo 'no failure, no GPU' || echo 'FAILED')"
    [ $FAILED -eq 0 ] && exit 2 || exit 1
fi

note "plan         $(echo "$PLAN" | awk '{ printf "%s(%ss) ", $1, $3 }')"
gpu_test() {  # gpu_test NAME FILE "SCRIPT ARGS" PYTEST_NODE...: pytest when installed, else the file's script mode
    local name="$1" file="$2" script_args="$3"; shift 3
    if "$PY" -c "import pytest" 2>/dev/null; then
        local nodes=()
        for n in "$@"; do nodes+=("$file::$n"); done
        step "$name" "$PY" -m pytest -q -p no:cacheprovider -rs "${nodes[@]}"
    else
        # shellcheck disable=SC2086
        step "$name" "$PY" "$file" $script_args
    fi
}

SAN="$(command -v compute-sanitizer 2>/dev/null || true)"
[ -z "$SAN" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
[ -z "$SAN" ] && note "sanitizer    SKIPPED        compute-sanitizer not found"
sanitizer() {  # sanitizer NAME TOOL CASE_FILE
    [ -n "$SAN" ] || return 0
    step "$1" "$SAN" --tool "$2" --target-processes all --error-exitcode 1 "$PY" "$3"
}

# ---- 3-5. GPU tests, compute-sanitizer, benchmarks, in the plan's order (most informative first)
IT=tests/gpu/test_intranode_cuda.py
LT=tests/gpu/test_ll_cuda.py
NT=tests/gpu/test_internode_cuda.py
for name in $(echo "$PLAN" | awk '$2 != "core" { print $1 }'); do
    case "$name" in
        intranode_a) gpu_test "$name" $IT "2 4" "test_intranode_matches_portable[2]" "test_intranode_matches_portable[4]" ;;
        intranode_b) gpu_test "$name" $IT "3 8" "test_intranode_matches_portable[3]" "test_intranode_matches_portable[8]" ;;
        ll_peer) gpu_test "$name" $LT "peer:2 peer:4" "test_ll_peer_matches_portable[2]" "test_ll_peer_matches_portable[4]" \
            "test_ll_through_buffer" ;;
        ll_nvshmem) gpu_test "$name" $LT "nvshmem:2" "test_ll_nvshmem_matches_portable[2]" ;;
        internode_a) gpu_test "$name" $NT "2x2:peer" "test_internode_matches_portable[2x2-peer]" ;;
        internode_b) gpu_test "$name" $NT "4x1:peer 2x3:peer" "test_internode_matches_portable[4x1-peer]" \
            "test_internode_matches_portable[2x3-peer]" ;;
        internode_c) gpu_test "$name" $NT "2x4:peer 4x2:peer" "test_internode_matches_portable[2x4-peer]" \
            "test_internode_matches_portable[4x2-peer]" ;;
        internode_nvshmem) gpu_test "$name" $NT "2x2:nvshmem 2x2:nvshmem-net" \
            "test_internode_matches_portable[2x2-nvshmem]" "test_internode_matches_portable[2x2-nvshmem-net]" ;;
        memcheck) sanitizer "$name" memcheck tests/gpu/sanitize_case.py ;;
        racecheck) sanitizer "$name" racecheck tests/gpu/sanitize_case.py ;;
        ll_memcheck) sanitizer "$name" memcheck tests/gpu/sanitize_ll_case.py ;;
        in_memcheck) sanitizer "$name" memcheck tests/gpu/sanitize_internode_case.py ;;
        bench) step "$name" "$PY" tests/gpu/bench_intranode.py --ranks 2 4 8 --tokens 2048 --iters 3 \
            --json "$OUT_DIR/bench.json" ;;
        bench_ll) step "$name" "$PY" tests/gpu/bench_ll.py --ranks 2 4 8 --tokens 128 --hidden 7168 --experts 64 \
            --iters 10 --json "$OUT_DIR/bench_ll.json" ;;
        bench_internode) step "$name" "$PY" tests/gpu/bench_internode.py --layouts 2x2 4x2 --tokens 512 --iters 3 \
            --json "$OUT_DIR/bench_internode.json" ;;
        *) note "$(printf '%-17s %-14s' "$name" "FAIL") no command for this planned step"; FAILED=1 ;;
    esac
done

summary_end "$([ $FAILED -eq 0 ] && echo 'ALL THAT RAN PASSED' || echo 'FAILED')"
exit $FAILED
