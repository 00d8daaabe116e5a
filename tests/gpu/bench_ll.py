"""Single-GPU latency benchmark of the CUDA low-latency engine: N ranks (processes) share one GPU.

Reports, for N = 2, 4, 8 (``--ranks``), in microseconds per call (the slowest rank's mean over
``--iters`` calls, each call followed by a stream synchronisation and preceded by nothing else):

* ``dispatch`` / ``combine``: one call, send and receive;
* ``dispatch_send`` / ``dispatch_recv`` and ``combine_send`` / ``combine_recv``: the same split with
  ``return_recv_hook`` (the call launches the send, ``hook()`` the receive);
* ``graph_dispatch_combine``: one replay of a CUDA graph holding a dispatch and its combine.

All ranks share one GPU and its kernels are time-sliced between processes (no MPS), so a wait for a
peer costs up to a time slice: these numbers are an upper bound of the kernels' own latency, not a
measurement of NVLink or RDMA. Default shape: DeepEP's LL test (128 tokens, hidden 7168, top-8,
288 experts -> rounded down to a multiple of the rank count), FP8 dispatch.

    python tests/gpu/bench_ll.py --ranks 2 4 8 --transport peer --json out.json
"""

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import run_ranks  # noqa: E402


def _timed_us(fn, iters: int, comm) -> float:
    torch.cuda.synchronize()
    comm.barrier(op="bench")
    total = 0.0
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        total += time.perf_counter() - start
    return total / iters * 1e6


def bench_worker(rank, num_ranks, group, args):
    from deep_ep import Buffer
    from deep_ep._comm import Communicator
    from deep_ep.engines.cuda_ll import CudaLowLatency
    torch.cuda.set_device(rank % torch.cuda.device_count())
    experts = args.experts // num_ranks * num_ranks
    rdma = Buffer.get_low_latency_rdma_size_hint(args.tokens, args.hidden, num_ranks, experts)
    comm = Communicator(group)
    eng = CudaLowLatency(comm, rdma, False, args.transport, single_host=True)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(args.tokens, experts, device="cuda", generator=gen).topk(args.topk, dim=1).indices
    topk_w = torch.rand(args.tokens, args.topk, device="cuda", generator=gen)
    fp8 = not args.bf16

    def dispatch(hook=False):
        return eng.dispatch(x, topk_idx, args.tokens, experts, None, None, fp8, False, False, hook)

    out = dispatch()
    y = torch.randn(experts // num_ranks, num_ranks * args.tokens, args.hidden, device="cuda").to(torch.bfloat16)
    handle = out[2]

    def combine(hook=False):
        return eng.combine(y, topk_idx, topk_w, handle, False, False, hook, None, None)

    results = {"dispatch_us": _timed_us(dispatch, args.iters, comm), "combine_us": _timed_us(combine, args.iters, comm)}
    for name, fn in (("dispatch", dispatch), ("combine", combine)):
        send = recv = 0.0
        comm.barrier(op="bench")
        for _ in range(args.iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hook = fn(True)[-1]
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            hook()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            send, recv = send + t1 - t0, recv + t2 - t1
        results[f"{name}_send_us"] = send / args.iters * 1e6
        results[f"{name}_recv_us"] = recv / args.iters * 1e6
    # dispatch + combine captured in one CUDA graph (what decoding loops replay)
    def both():
        out = dispatch()
        return eng.combine(y, topk_idx, topk_w, out[2], False, False, False, None, None)

    both()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        both()
    results["graph_dispatch_combine_us"] = _timed_us(graph.replay, args.iters, comm)
    torch.cuda.synchronize()
    del graph
    eng.destroy(collective=True)
    comm.close()
    return results


OPS = ("dispatch", "combine", "dispatch_send", "dispatch_recv", "combine_send", "combine_recv",
       "graph_dispatch_combine")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=288)
    parser.add_argument("--bf16", action="store_true", help="BF16 dispatch (default FP8)")
    parser.add_argument("--transport", default="peer", choices=("peer", "nvshmem"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    report = {"device": torch.cuda.get_device_name(), "args": vars(args), "runs": []}
    env = {"DEEP_EP_TIMEOUT_S": "60"}
    if args.transport == "nvshmem":
        env.update({"NVSHMEM_IB_ENABLE_IBGDA": "0", "NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_DISABLE_NVLS": "1",
                    "NVSHMEM_DISABLE_NCCL": "1"})
    for n in args.ranks:
        per_rank = run_ranks(bench_worker, n, args, timeout_s=180, env=env)
        row = {"ranks": n}
        for op in OPS:
            row[f"{op}_us"] = max(r[f"{op}_us"] for r in per_rank)
        report["runs"].append(row)
        print(f"{n} ranks on one GPU ({args.transport}): " + ", ".join(f"{op} {row[op + '_us']:.1f} us" for op in OPS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
