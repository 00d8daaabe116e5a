"""Single-GPU benchmark of the internode (two-hop) CUDA kernels with virtual nodes: NODES x P ranks
(processes) share one GPU, ``DEEP_EP_RANKS_PER_NODE = P``, RDMA hop over peer memory.

Reports, per layout (``--layouts 2x2 2x4 4x2``): dispatch, cached dispatch and combine time, and two
bandwidths in DeepEP's convention, summed over the ranks:
  * recv GB/s  bytes of token rows the ranks receive in dispatch (send back in combine) / time;
  * RDMA GB/s  bytes of token rows that cross the RDMA hop (each token once per destination node,
               ``recv_rdma_rank_prefix_sum[-1]`` rows per forwarder) / time.
The device-to-device copy bandwidth of the same run is the ceiling. All ranks share one GPU and are
time-sliced (no MPS): the numbers measure the kernels' cost on one device, not a network.

    python tests/gpu/bench_internode.py --layouts 2x2 4x2 --json out.json
"""

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from bench_intranode import copy_bandwidth, run_ops  # noqa: E402
from dist_utils import run_ranks  # noqa: E402


def bench_worker(rank, num_ranks, group, args):
    import deep_ep
    torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ["DEEP_EP_ENGINE"] = "cuda"
    config = deep_ep.Config(args.num_sms, args.nvl_chunk, args.nvl_ring, args.rdma_chunk, args.rdma_ring)
    per_node = int(os.environ["DEEP_EP_RANKS_PER_NODE"])
    nvl = config.get_nvl_buffer_size_hint(args.hidden * 2, num_ranks, num_ranks_per_node=per_node)
    rdma = config.get_rdma_buffer_size_hint(args.hidden * 2, num_ranks, num_ranks_per_node=per_node)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, explicitly_destroy=True)
    assert buffer.engine == "cuda" and buffer.num_nodes > 1, buffer.engine_reason
    results, handle = run_ops(buffer, rank, args, config)
    results["rdma_bytes"] = int(handle[4][-1]) * args.hidden * 2  # rows this rank forwarded
    buffer.destroy()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["2x2", "2x4", "4x2"], help="NODESxRANKS_PER_NODE")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--num-sms", type=int, default=16)
    parser.add_argument("--nvl-chunk", type=int, default=6)
    parser.add_argument("--nvl-ring", type=int, default=128)
    parser.add_argument("--rdma-chunk", type=int, default=8)
    parser.add_argument("--rdma-ring", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    report = {"device": torch.cuda.get_device_name(), "args": vars(args), "copy": copy_bandwidth(), "runs": []}
    print(f"device {report['device']}: copy {report['copy']['copy_GBps']:.0f} GB/s "
          f"({report['copy']['read_plus_write_GBps']:.0f} GB/s read+write)")
    for layout in args.layouts:
        nodes, per_node = (int(v) for v in layout.split("x"))
        n = nodes * per_node
        per_rank = run_ranks(bench_worker, n, args, ranks_per_node=per_node, timeout_s=240,
                             env={"DEEP_EP_TIMEOUT_S": "60"})
        recv_total = sum(r["recv_bytes"] for r in per_rank)
        rdma_total = sum(r["rdma_bytes"] for r in per_rank)
        row = {"layout": layout, "ranks": n, "recv_bytes_total": recv_total, "rdma_bytes_total": rdma_total}
        for op in ("dispatch", "cached_dispatch", "combine"):
            t = max(r[f"{op}_s"] for r in per_rank)
            row[f"{op}_ms"] = t * 1e3
            row[f"{op}_recv_GBps"] = recv_total / t / 1e9
            row[f"{op}_rdma_GBps"] = rdma_total / t / 1e9
        report["runs"].append(row)
        print(f"{layout} virtual nodes on one GPU: " + ", ".join(
            f"{op} {row[f'{op}_ms']:.2f} ms = {row[f'{op}_recv_GBps']:.1f} GB/s recv, "
            f"{row[f'{op}_rdma_GBps']:.1f} GB/s RDMA" for op in ("dispatch", "cached_dispatch", "combine"))
            + f" ({recv_total / 1e6:.1f} MB received, {rdma_total / 1e6:.1f} MB over RDMA)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
