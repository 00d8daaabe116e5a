"""The network cost model of the internode kernels (docs/internode-cost.md): NVSHMEM operations per rank
per dispatch and per combine, before (commit ef6bc55) and after issue 13, for N nodes x L ranks per
node, with the expected routing of uniformly random top-k experts. Prints the markdown tables of the doc.

    python benchmarks/internode_cost_model.py [--tokens 4096] [--topk 8] [--channels 12] [--qps 24]

The exact "after" counts of one operation, from its handle, are computed by ``model_counts`` in
tests/test_internode_cost.py, which asserts them against the NVSHMEM stand-in's call counts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WARPS = 16  # kNumInternodeWarps: the combine forwarder's window and the reducer's batch (rings >= 16)


def expected(nodes: int, local: int, tokens: int, topk: int, channels: int, chunk: int) -> dict:
    """Per rank: tokens per destination node and chunks per (channel, remote node), expected values."""
    p = 1.0 - (1.0 - 1.0 / nodes) ** topk           # a token needs a given node (random experts)
    per_channel = tokens * p / channels              # tokens of one channel towards one node
    return dict(p=p, per_channel=per_channel,
                chunks=channels * math.ceil(per_channel / chunk),            # per remote node, dispatch
                windows=channels * math.ceil(per_channel / WARPS),           # per remote node, combine fwd
                batches=channels * math.ceil(tokens / channels / WARPS))     # reducer batches (all nodes)


def before(N: int, L: int, T: int, K: int, C: int, S: int) -> dict:
    """Commit ef6bc55 (transport_nvshmem.cuh: quiet in every complete_warp, fence + int atomic per signal)."""
    e = expected(N, L, T, K, C, S)
    remote_ranks, remote_nodes = (N - 1) * L, N - 1
    team = max(1, WARPS // N)                        # dispatch sender warps per destination node
    d = dict(put=0.0, signal=0.0, quiet=0.0, fence=0.0)
    # notify: 2 barriers (16 warps quiet; a fence + int atomic per remote rank), meta rows = 1 put each
    d["quiet"] += 2 * WARPS
    d["fence"] += 2 * remote_ranks
    d["signal"] += 2 * remote_ranks
    d["put"] += remote_ranks
    # sender: 1 put per message, every team warp quiets per chunk (own node too), fence + atomic per chunk
    d["put"] += T * e["p"] * remote_nodes
    d["quiet"] += team * e["chunks"] * N
    d["fence"] += e["chunks"] * remote_nodes
    d["signal"] += e["chunks"] * remote_nodes
    # forwarder: lazy heads (at least one per chunk: counted so), fence + atomic each; 16 quiets at the end
    d["fence"] += e["chunks"] * remote_nodes
    d["signal"] += e["chunks"] * remote_nodes
    d["quiet"] += WARPS * C
    c = dict(put=0.0, signal=0.0, quiet=0.0, fence=0.0)
    # ring reset: 2 barriers
    c["quiet"] += 2 * WARPS
    c["fence"] += 2 * remote_ranks
    c["signal"] += 2 * remote_ranks
    # forwarder: one warp per token, every one quiets (own node too), a put per remote token;
    # fence + atomic per window; 16 quiets at the end
    c["quiet"] += T * e["p"] * N + WARPS * C
    c["put"] += T * e["p"] * remote_nodes
    c["fence"] += e["windows"] * remote_nodes
    c["signal"] += e["windows"] * remote_nodes
    # reducer: fence + atomic per batch per remote node; 16 quiets at the end
    c["fence"] += e["batches"] * remote_nodes
    c["signal"] += e["batches"] * remote_nodes
    c["quiet"] += WARPS * C
    return dict(dispatch=d, combine=c)


def after(N: int, L: int, T: int, K: int, C: int, S: int) -> dict:
    """Issue 13: a put-with-signal per chunk / window, ADDed heads, one quiet per operation."""
    e = expected(N, L, T, K, C, S)
    remote_ranks, remote_nodes = (N - 1) * L, N - 1
    d = dict(put=0.0, signal=0.0, quiet=1.0, fence=0.0)
    d["signal"] += remote_ranks                      # barrier 1
    d["put"] += remote_ranks                         # meta rows with signal = barrier 2
    d["put"] += e["chunks"] * remote_nodes           # sender: one put-with-signal per chunk
    d["signal"] += e["chunks"] * remote_nodes        # forwarder: one head ADD per chunk
    c = dict(put=0.0, signal=0.0, quiet=1.0, fence=0.0)
    c["signal"] += 2 * remote_ranks                  # ring reset: 2 barriers
    c["put"] += e["windows"] * remote_nodes          # forwarder: one put-with-signal per window
    c["signal"] += e["batches"] * remote_nodes       # reducer: one head ADD per batch per remote node
    return dict(dispatch=d, combine=c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--channels", type=int, default=12)
    ap.add_argument("--qps", type=int, default=24, help="NVSHMEM_IBGDA_NUM_RC_PER_PE (num_qps_per_rank)")
    ap.add_argument("--dcis", type=int, default=1, help="DCIs per PE counted per quiet/fence")
    args = ap.parse_args()
    from deep_ep.config import get_dispatch_config
    T, K, C = args.tokens, args.topk, args.channels
    print(f"T = {T} tokens per rank, top-{K} of uniformly random experts, C = {C} channels; per rank, per "
          f"operation; puts include puts-with-signal; QP visits = (quiets + fences) x QPs per sweep\n")
    print("| shape | op | version | puts | signals | quiets | fences | QPs per sweep | QP visits |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for N, L in ((2, 8), (4, 8), (16, 8)):
        R = N * L
        S = get_dispatch_config(R, 2 * C).num_max_rdma_chunked_send_tokens
        q = args.dcis + args.qps * (R - 1)
        for op in ("dispatch", "combine"):
            for name, model in (("before", before), ("after", after)):
                m = model(N, L, T, K, C, S)[op]
                visits = (m["quiet"] + m["fence"]) * q
                print(f"| {N}x{L} (S={S}) | {op} | {name} | {m['put']:,.0f} | {m['signal']:,.0f} | {m['quiet']:,.0f} | "
                      f"{m['fence']:,.0f} | {q:,} | {visits:,.0f} |")


if __name__ == "__main__":
    main()
