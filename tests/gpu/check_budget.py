"""Time budget of ``tests/gpu/device_check.sh``: each step's limit computed from a cost model, the steps in
order of how much they tell, and only the steps whose whole limit still fits in the 8 minutes started.

A correct kernel must never be reported as TIMEOUT, so a step is never started with less time than its
limit: it is reported as NOT RUN (budget) instead, and the summary says which steps ran and how to run
the others (``DEVICE_CHECK_ONLY=name,...``).

The arithmetic. No step has run on a GPU yet, so every constant is an assumption, stated here and chosen
pessimistic; replace one by a measurement when a run's summary gives it (each step's seconds are
printed).

    PROC_S        8 s    one run_ranks call: spawn, ``import torch`` + deep_ep, CUDA context (ranks start
                         in parallel on the 16 cores)
    PER_RANK_S    0.5 s  per rank of a run_ranks call: contexts on one GPU are created one after another
    PYTEST_S      6 s    one pytest process: start, import torch, collect
    SETUP_S       2 s    buffers of a run: cudaMalloc, CUDA IPC handle exchange, barriers
    NVSHMEM_S     30 s   a run that initialises NVSHMEM: bootstrap, symmetric heap, teams, finalize
    CASE_S        1 s    one case (dispatch + combine compared with the portable engine) PER RANK of the
                         run: N processes share the GPU by time slices, so every wait for a peer costs
                         up to N slices; the case's CPU reference work is included
    SAN_START_S   5 s    compute-sanitizer attaching to one process (the launcher + every rank)
    SAN_FACTOR    10     slowdown of instrumented kernels and CUDA calls under memcheck (racecheck: 2x)
    BUILD_S       60 s   build_core.py: 27.5 to 33.5 s measured with 2 jobs on 2 shared CPU cores (the
                         device machine has 16), doubled for a cold toolkit
    SAFETY        1.5    limit = ceil(need * SAFETY)

    run(N, cases)            = PROC_S + PER_RANK_S * N + SETUP_S + cases * CASE_S * N   (+ NVSHMEM_S)
    sanitized(N, cases, f)   = PROC_S + PER_RANK_S * N + SAN_START_S * (N + 1) + f * (SETUP_S + cases * CASE_S * N)

Each step's need is written out in `STEPS` with the number of cases of its files (7 intranode cases + 2
extras on 2 and 4 ranks; 7 low-latency cases + 2 extras; 7 internode cases + 1 extra on 2x2 peer).
``python tests/gpu/check_budget.py explain`` prints every step's need, limit and formula; ``plan``
prints ``name group limit_s`` lines in run order for the shell; the CPU test is
``tests/test_device_check_budget.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

BUDGET_S = 470          # 8 minutes, less 10 s for the summary and the environment probe
PROC_S = 8.0
PER_RANK_S = 0.5
PYTEST_S = 6.0
SETUP_S = 2.0
NVSHMEM_S = 30.0
CASE_S = 1.0
SAN_START_S = 5.0
SAN_FACTOR = 10.0
BUILD_S = 60.0
SAFETY = 1.5

INTRANODE_CASES, INTRANODE_EXTRAS = 7, 2   # tests/gpu/intranode_cases.py CASES; async + graph on 2 and 4 ranks
LL_CASES, LL_EXTRAS = 7, 2                 # tests/gpu/ll_cases.py LL_CASES; graph + shrink
LL_BUFFER_CASES = 2                        # buffer_worker: async_finish and hook
INTERNODE_CASES, INTERNODE_EXTRAS = 7, 1   # tests/gpu/internode_cases.py CASES; graph on 2x2 peer
BENCH_CASES = 4                            # a benchmark run: warm-up + iterations of each op, in case units


def run(n: int, cases: float, nvshmem: bool = False) -> float:
    """Seconds of one run_ranks call with `n` ranks on the GPU doing `cases` cases."""
    return PROC_S + PER_RANK_S * n + SETUP_S + cases * CASE_S * n + (NVSHMEM_S if nvshmem else 0.0)


def sanitized(n: int, cases: float, factor: float = SAN_FACTOR) -> float:
    """Seconds of one run_ranks call of `n` ranks under compute-sanitizer (slowdown `factor`)."""
    return PROC_S + PER_RANK_S * n + SAN_START_S * (n + 1) + factor * (SETUP_S + cases * CASE_S * n)


@dataclass(frozen=True)
class Step:
    name: str
    group: str        # "core" (always), "intranode", "ll", "internode"
    need_s: float
    formula: str

    @property
    def limit_s(self) -> int:
        return int(math.ceil(self.need_s * SAFETY))


def _steps() -> List[Step]:
    ic, ie = INTRANODE_CASES, INTRANODE_CASES + INTRANODE_EXTRAS
    lc = LL_CASES + LL_EXTRAS
    nc = INTERNODE_CASES
    return [  # most informative first
        Step("build", "core", BUILD_S, "BUILD_S"),
        Step("load", "core", 10.0, "10 s: one Python start, load the two libraries"),
        Step("intranode_a", "intranode", PYTEST_S + run(2, ie) + run(4, ie),
             "PYTEST_S + run(2, 7+2) + run(4, 7+2): intranode vs portable, async, CUDA graph"),
        Step("ll_peer", "ll", PYTEST_S + run(2, lc) + run(4, lc) + run(2, LL_BUFFER_CASES),
             "PYTEST_S + run(2, 7+2) + run(4, 7+2) + run(2, 2): low latency over peer memory, graph, shrink, Buffer"),
        Step("internode_a", "internode", PYTEST_S + run(4, nc + INTERNODE_EXTRAS),
             "PYTEST_S + run(4, 7+1): internode 2x2 over peer memory, CUDA graph"),
        Step("memcheck", "intranode", sanitized(2, 1), "sanitized(2, 1): memcheck, intranode tiny case"),
        Step("ll_memcheck", "ll", sanitized(2, 1), "sanitized(2, 1): memcheck, low-latency tiny case"),
        Step("intranode_b", "intranode", PYTEST_S + run(3, ic) + run(8, ic),
             "PYTEST_S + run(3, 7) + run(8, 7): intranode with 3 and 8 ranks"),
        Step("ll_nvshmem", "ll", PYTEST_S + run(2, lc, nvshmem=True),
             "PYTEST_S + run(2, 7+2, NVSHMEM): low latency over NVSHMEM, 2 PEs on this GPU"),
        Step("internode_nvshmem", "internode", PYTEST_S + 2 * run(4, nc, nvshmem=True),
             "PYTEST_S + 2 run(4, 7, NVSHMEM): internode 2x2 over NVSHMEM, with and without load/store"),
        Step("internode_b", "internode", PYTEST_S + run(4, nc) + run(6, nc),
             "PYTEST_S + run(4, 7) [4x1] + run(6, 7) [2x3]: one rank per node, an odd node size"),
        Step("internode_c", "internode", PYTEST_S + run(8, nc) + run(8, nc),
             "PYTEST_S + run(8, 7) [2x4] + run(8, 7) [4x2]: 8 ranks"),
        Step("in_memcheck", "internode", sanitized(4, 1), "sanitized(4, 1): memcheck, internode 2x2 tiny case"),
        Step("racecheck", "intranode", sanitized(2, 1, 2 * SAN_FACTOR), "sanitized(2, 1, 2 SAN_FACTOR): racecheck"),
        Step("bench_ll", "ll", run(2, BENCH_CASES) + run(4, BENCH_CASES) + run(8, BENCH_CASES),
             "run(2|4|8, 4): low-latency latency benchmark"),
        Step("bench", "intranode", run(2, BENCH_CASES) + run(4, BENCH_CASES) + run(8, BENCH_CASES),
             "run(2|4|8, 4): intranode GB/s benchmark"),
        Step("bench_internode", "internode", run(4, BENCH_CASES) + run(8, BENCH_CASES),
             "run(4, 4) [2x2] + run(8, 4) [4x2]: internode GB/s benchmark"),
    ]


STEPS: List[Step] = _steps()
GROUPS = ("intranode", "ll", "internode")


def select(only: str = "") -> List[Step]:
    """The steps to consider, in run order. `only`: comma-separated groups and/or step names (empty or
    "all": every step); the core steps (build, load) always come first."""
    wanted = {w.strip() for w in only.split(",") if w.strip()} - {"all"}
    unknown = wanted - set(GROUPS) - {s.name for s in STEPS}
    if unknown:
        raise ValueError(f"DEVICE_CHECK_ONLY: unknown group or step {sorted(unknown)}; groups {list(GROUPS)}, "
                         f"steps {[s.name for s in STEPS if s.group != 'core']}")
    return [s for s in STEPS if s.group == "core" or not wanted or s.group in wanted or s.name in wanted]


def simulate(steps: Sequence[Step], budget_s: float, duration: Callable[[Step], float],
             elapsed_s: float = 0.0) -> Tuple[List[str], List[str], float]:
    """What the shell does: in order, start a step only if its whole limit fits in what is left (a step
    never gets less than its limit, so it is never cut short by the budget); a step that does not fit is
    NOT RUN and later, cheaper steps are still tried. Returns (ran, not run, elapsed)."""
    ran, not_run = [], []
    for s in steps:
        if s.limit_s > budget_s - elapsed_s:
            not_run.append(s.name)
            continue
        ran.append(s.name)
        elapsed_s += min(duration(s), s.limit_s)
    return ran, not_run, elapsed_s


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("plan", "explain"))
    parser.add_argument("--only", default="", help="DEVICE_CHECK_ONLY: groups and/or step names")
    parser.add_argument("--budget", type=float, default=BUDGET_S)
    args = parser.parse_args(argv)
    try:
        steps = select(args.only)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "plan":
        for s in steps:
            print(f"{s.name} {s.group} {s.limit_s}")
        return 0
    print(f"{'step':<18} {'group':<10} {'need':>6} {'limit':>6}  formula")
    for s in steps:
        print(f"{s.name:<18} {s.group:<10} {s.need_s:6.1f} {s.limit_s:6d}  {s.formula}")
    ran, not_run, elapsed = simulate(steps, args.budget, lambda s: s.need_s)
    print(f"expected in {args.budget:.0f} s (each step taking its need): run {' '.join(ran)}; "
          f"not run {' '.join(not_run) or '-'}; about {elapsed:.0f} s")
    ran, not_run, elapsed = simulate(steps, args.budget, lambda s: s.limit_s)
    print(f"worst case (each step taking its whole limit): run {' '.join(ran)}; not run {' '.join(not_run) or '-'}; "
          f"{elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
