"""Pressure (short CI version of ``benchmarks/pressure.py``): random shapes and routings, many calls.

Four ranks laid out as two nodes of two (the multi-node handle and hierarchical combine), 80
iterations, run twice with the same seed on the same Buffer. Checks, on every rank:

* every iteration's outputs are right (identity experts) and reusing the handle of an earlier
  iteration reproduces that iteration's outputs bit for bit;
* determinism: the SHA-256 of every output and handle field is identical in both runs;
* memory stays flat: RSS (``/proc/self/statm``) after warm-up vs the end, live tensors, threads and
  open file descriptors.

The long run is ``python benchmarks/pressure.py --iters 1000``.
"""

from dist_utils import make_seed, run_ranks

from benchmarks.pressure import compare, pressure_rank

ITERS = 80
RSS_TOLERANCE = 32 * 2**20


def test_pressure_deterministic_and_flat():
    seed = make_seed()
    results = run_ranks(pressure_rank, 4, ITERS, seed, 2, True, "cpu", ranks_per_node=2, timeout_s=240)
    for rank, res in enumerate(results):
        warm, end = res["snap_warm"], res["snap_end"]
        print(f"rank {rank}: runs {['%.1f s' % s for s in res['seconds']]}, rss {warm['rss'] / 2**20:.1f} -> "
              f"{end['rss'] / 2**20:.1f} MiB, tensors {warm['tensors']} -> {end['tensors']}, threads "
              f"{warm['threads']} -> {end['threads']}, fds {warm['fds']} -> {end['fds']}")
    problems = compare(results, RSS_TOLERANCE)
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
