"""Correctness check of normal-mode dispatch/combine across real nodes, under any launch.

Every rank draws all ranks' inputs from one seed and compares its outputs and handle with a check:
  * ``--device cpu`` (default): deep_ep (portable engine, gloo) against the independent global-view
    reference (``tests/reference.py``), every case of ``tests/test_normal.py`` (``--quick``: 3 of them);
  * ``--device cuda``: the CUDA engine against the portable engine on the same CUDA tensors (the
    intranode or internode cases of ``tests/gpu/``); it reports which engine each Buffer chose.

Launch (``benchmarks/common.py``, the same as the benchmarks; the commands, all tested, are in
docs/launching.md):
  * one machine:  ``python tests/multinode_check.py --num-ranks 4 --ranks-per-node 2``
  * torchrun:  ``python -m torch.distributed.run --nproc-per-node 4 tests/multinode_check.py`` (WORLD_SIZE = ranks)
  * one launch per node (DeepEP's convention), on node k of N:
        ``MASTER_ADDR=<node 0> MASTER_PORT=29500 WORLD_SIZE=N RANK=k python tests/multinode_check.py --num-ranks 8``
    (``--num-ranks`` = ranks on this node; nodes are told apart by host name, or by ``--ranks-per-node``)
  * mpirun:  ``mpirun --allow-run-as-root --oversubscribe -np 16 -H a:8,b:8 -x MASTER_ADDR -x MASTER_PORT python
    tests/multinode_check.py`` (the two flags: Open MPI as root / more ranks than cores)

Exit status 0 when every rank passed (printed by the process that hosts rank 0), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, os.path.join(_HERE, "gpu"), _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import LaunchError, add_launch_args, launch  # noqa: E402


def _layout(group) -> int:
    """Ranks per node as deep_ep.Buffer detects it (host names, or DEEP_EP_RANKS_PER_NODE)."""
    import deep_ep
    probe = deep_ep.Buffer(group, num_nvl_bytes=0, explicitly_destroy=True)
    per_node = probe.num_ranks_per_node
    probe.destroy()
    return per_node


def worker(ctx, args) -> dict:
    os.environ.setdefault("DEEP_EP_TIMEOUT_S", "60")
    os.environ["LOCAL_RANK"] = str(ctx.local_rank)  # the GPU tests' cases pick their device from it
    per_node = _layout(ctx.group)
    multi_node = per_node < ctx.num_ranks
    if ctx.device.type == "cpu":
        import test_normal
        cases = test_normal.CASES[:3] if args.quick else test_normal.CASES
        failures = test_normal._run_topology(ctx.rank, ctx.group, ctx.num_ranks, per_node if multi_node else None,
                                             args.seed, cases)
        engine = "portable"
    else:
        if multi_node:
            import internode_cases as cases_module
            run = cases_module.internode_worker
        else:
            import intranode_cases as cases_module
            run = cases_module.intranode_worker
        cases = cases_module.CASES[:3] if args.quick else cases_module.CASES
        failures = run(ctx.rank, ctx.num_ranks, ctx.group, args.seed, cases, False)
        engine = "cuda vs portable"
    everyone = [None] * ctx.num_ranks
    dist.all_gather_object(everyone, (failures, os.uname().nodename), group=ctx.group)
    return {"failures": [line for f, _ in everyone for line in f], "hosts": [h for _, h in everyone],
            "ranks_per_node": per_node, "engine": engine}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_launch_args(parser, default_ranks=4)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("DEEP_EP_TEST_SEED", "20261128")))
    parser.add_argument("--quick", action="store_true", help="3 cases instead of all")
    args = parser.parse_args()
    try:
        result = launch(worker, args, prefix="[multinode_check]")
    except LaunchError as exc:
        print(f"[multinode_check] FAIL: {exc}", flush=True)
        return 1
    if result is None:  # a process that does not host rank 0
        return 0
    hosts = result["hosts"]
    nodes = len(hosts) // result["ranks_per_node"]
    print(f"[multinode_check] {len(hosts)} ranks, {nodes} node(s) of {result['ranks_per_node']} "
          f"(hosts: {sorted(set(hosts))}), {result['engine']}, seed {args.seed}", flush=True)
    if result["failures"]:
        print(f"[multinode_check] FAIL: {len(result['failures'])} mismatches\n" + "\n".join(result["failures"][:60]))
        return 1
    print("[multinode_check] PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
