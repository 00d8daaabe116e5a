"""What the rank agreement (deep_ep/_agree.py) costs per call, on CPU ranks (gloo on one host).

Cached dispatch, combine and clean_low_latency_buffer gain one small exchange (the descriptor plus ``2 R``
row counts); dispatch and the low-latency calls carry the descriptor in the exchange they already did.
This prints, per shape, the median time of that exchange alone next to the median time of the whole
cached dispatch and combine (the exchange's share is the cost)::

    PYTHONPATH=. python benchmarks/agreement_cost.py --num-ranks 4
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def worker(rank, R, group, shapes, iters):
    import torch
    import torch.distributed as dist
    import deep_ep
    from deep_ep import _agree
    nvl = max(c.get_nvl_buffer_size_hint(max(h for _, h in shapes) * 2, R)
              for c in (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)))
    buf = deep_ep.Buffer(group, num_nvl_bytes=nvl)
    rows = []
    for tokens, hidden in shapes:
        g = torch.Generator().manual_seed(rank)
        E = 4 * R
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        topk_idx = torch.rand(tokens, E, generator=g).topk(4, dim=1).indices
        w = torch.rand(tokens, 4)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                       num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                       topk_weights=w)
        counts = torch.zeros(2 * R, dtype=torch.int64)
        times = {"agreement exchange": [], "cached dispatch": [], "combine": []}
        for _ in range(iters):
            dist.barrier(group)
            t0 = time.perf_counter()
            _agree.exchange(buf._comm, counts, "benchmark (agreement)")
            t1 = time.perf_counter()
            buf.dispatch(x, handle=handle)
            t2 = time.perf_counter()
            buf.combine(recv_x, handle, topk_weights=recv_w)
            t3 = time.perf_counter()
            times["agreement exchange"].append(t1 - t0)
            times["cached dispatch"].append(t2 - t1)
            times["combine"].append(t3 - t2)
        rows.append((tokens, hidden, {k: statistics.median(v) * 1e3 for k, v in times.items()}))
    return rows


def main():
    from dist_utils import run_ranks
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-ranks", type=int, default=4)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    shapes = [(16, 256), (256, 1024), (1024, 4096)]
    rows = run_ranks(worker, args.num_ranks, shapes, args.iters, timeout_s=600)[0]
    print(f"{args.num_ranks} ranks, medians of {args.iters} calls (rank 0), milliseconds")
    print("tokens x hidden | agreement exchange | cached dispatch (incl.) | combine (incl.) | share of combine")
    for tokens, hidden, t in rows:
        print(f"{tokens} x {hidden} | {t['agreement exchange']:.3f} | {t['cached dispatch']:.3f} | "
              f"{t['combine']:.3f} | {100 * t['agreement exchange'] / t['combine']:.0f}%")


if __name__ == "__main__":
    main()
