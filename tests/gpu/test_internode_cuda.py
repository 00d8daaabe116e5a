"""GPU tests of the internode (two-hop) CUDA kernels with virtual nodes on one GPU (skipped without a
CUDA device and the built core).

Layouts 2 nodes x 2 ranks, 2 x 4, 4 x 2, 4 x 1 and 2 x 3: ``num_nodes * ranks_per_node`` processes share one GPU over
a gloo group, ``DEEP_EP_RANKS_PER_NODE`` tells deep_ep the node layout, and the RDMA hop runs over the
peer-memory transport (CUDA IPC); 2 x 2 runs once more with the RDMA hop over NVSHMEM
(``DEEP_EP_INTERNODE_TRANSPORT=nvshmem``: 4 PEs on one GPU, NVSHMEM's P2P transport, IBGDA off). Every
output and all 10 handle fields are compared bit for bit with the portable engine
(``internode_cases.py``), plus a CUDA-graph captured ``num_worst_tokens`` dispatch on 2 x 2.

Runs under pytest, or as a script without pytest (the device check uses that when pytest is missing):
``python tests/gpu/test_internode_cuda.py [NODESxRANKS[:TRANSPORT] ...]``, e.g. ``2x2 4x2 2x2:nvshmem-net``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import make_seed, run_ranks  # noqa: E402
from internode_cases import CASES, internode_worker  # noqa: E402
from ll_cases import NVSHMEM_TEST_ENV  # noqa: E402

# (nodes, ranks per node, transport): the three layouts, one rank per node, an odd node size
# (3 ranks: a team of 5 warps and an idle warp), and 2 x 2 with the RDMA hop over NVSHMEM, once with
# NVSHMEM's load/store shortcut between the virtual nodes and once ("nvshmem-net") without it
# (DEEP_EP_INTERNODE_FORCE_NETWORK=1: staged puts, quiet and atomic signals, the real multi-node path).
LAYOUTS = [(2, 2, "peer"), (2, 4, "peer"), (4, 2, "peer"), (4, 1, "peer"), (2, 3, "peer"), (2, 2, "nvshmem"),
           (2, 2, "nvshmem-net")]


def _skip_reason(transport: str = "peer"):
    if not torch.cuda.is_available():
        return "no CUDA device"
    from deep_ep import _core
    if _core.load() is None:
        return _core.load_error()
    if transport.startswith("nvshmem") and _core.load_nvshmem() is None:
        return _core.nvshmem_load_error() or "libdeep_ep_nvshmem.so is not available"
    return None


def check_layout(num_nodes: int, ranks_per_node: int, transport: str, extras: bool) -> None:
    seed = make_seed()
    num_ranks = num_nodes * ranks_per_node
    env = {"DEEP_EP_TIMEOUT_S": "60", "DEEP_EP_INTERNODE_TRANSPORT": transport.split("-")[0]}
    if transport.startswith("nvshmem"):
        env.update(NVSHMEM_TEST_ENV)
    if transport == "nvshmem-net":
        env["DEEP_EP_INTERNODE_FORCE_NETWORK"] = "1"
    failures = run_ranks(internode_worker, num_ranks, seed, CASES, extras, ranks_per_node=ranks_per_node,
                         timeout_s=300, env=env)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches ({num_nodes}x{ranks_per_node} over {transport}, seed {seed}):\n" + \
        "\n".join(report[:60])


try:
    import pytest
except ImportError:  # script mode
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

    @pytest.mark.parametrize("num_nodes, ranks_per_node, transport", LAYOUTS,
                             ids=[f"{n}x{p}-{t}" for n, p, t in LAYOUTS])
    def test_internode_matches_portable(num_nodes, ranks_per_node, transport):
        reason = _skip_reason(transport)
        if reason is not None:
            pytest.skip(reason)
        check_layout(num_nodes, ranks_per_node, transport, extras=(num_nodes, ranks_per_node, transport) == (2, 2, "peer"))


if __name__ == "__main__":
    reason = _skip_reason()
    if reason is not None:
        print(f"SKIP: {reason}")
        sys.exit(0)
    layouts = []
    for arg in sys.argv[1:]:
        shape, _, transport = arg.partition(":")
        n, p = (int(v) for v in shape.split("x"))
        layouts.append((n, p, transport or "peer"))
    failed = 0
    for n, p, t in layouts or LAYOUTS:
        if _skip_reason(t) is not None:
            print(f"SKIP internode {n}x{p} over {t}: {_skip_reason(t)}")
            continue
        try:
            check_layout(n, p, t, extras=(n, p, t) == (2, 2, "peer"))
            print(f"PASS internode {n}x{p} over {t}")
        except AssertionError as exc:
            failed += 1
            print(f"FAIL internode {n}x{p} over {t}:\n{exc}")
    sys.exit(1 if failed else 0)
