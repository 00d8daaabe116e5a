"""Single-GPU benchmark of the CUDA engine: N ranks (processes) share one GPU.

Reports, for N = 2, 4, 8 (``--ranks``): dispatch, cached dispatch and combine time and bandwidth, next
to the device-to-device copy bandwidth measured in the same run. Bandwidth follows DeepEP's convention:
bytes of token rows a rank receives in dispatch (sends back in combine) divided by the time, summed
over the ranks. All ranks share one GPU, so they share its memory bandwidth and their kernels are
time-sliced (no MPS): the numbers measure the kernels' cost on one device, not NVLink.

    python tests/gpu/bench_intranode.py --ranks 2 4 8 --json out.json
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


def copy_bandwidth(num_bytes: int = 1 << 30, iters: int = 20) -> dict:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return {"bytes": num_bytes, "seconds": seconds, "copy_GBps": num_bytes / seconds / 1e9,
            "read_plus_write_GBps": 2 * num_bytes / seconds / 1e9}


def _timed(fn, iters: int, comm) -> float:
    torch.cuda.synchronize()
    comm.barrier(op="bench")
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench_worker(rank, num_ranks, group, args):
    import deep_ep
    torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ["DEEP_EP_ENGINE"] = "cuda"
    config = deep_ep.Config(args.num_sms, 6, args.ring, 6, 128)
    need = max(config.get_nvl_buffer_size_hint(args.hidden * 2, num_ranks), 1 << 20)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=(need + 127) // 128 * 128, explicitly_destroy=True)
    assert buffer.engine == "cuda", buffer.engine_reason
    results, _ = run_ops(buffer, rank, args, config)
    buffer.destroy()
    return results


def run_ops(buffer, rank: int, args, config):
    """Inputs from a seed, one checked-free warm dispatch, then timed dispatch, cached dispatch and
    combine on `buffer` (shared with bench_internode.py). Returns (timings and received bytes, handle)."""
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=gen).to(torch.bfloat16)
    scores = torch.rand(args.tokens, args.experts, device="cuda", generator=gen)
    topk_idx = scores.topk(args.topk, dim=1).indices.to(torch.int64)
    topk_weights = torch.rand(args.tokens, args.topk, device="cuda", generator=gen)
    lay = buffer.get_dispatch_layout(topk_idx, args.experts)
    kwargs = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                  num_tokens_per_expert=lay[2], topk_idx=topk_idx, topk_weights=topk_weights, config=config)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, **kwargs)
    y = recv_x.clone()
    comm = buffer._comm
    results = {}
    results["dispatch_s"] = _timed(lambda: buffer.dispatch(x, **kwargs), args.iters, comm)
    results["cached_dispatch_s"] = _timed(lambda: buffer.dispatch(x, handle=handle, config=config), args.iters, comm)
    results["combine_s"] = _timed(lambda: buffer.combine(y, handle, topk_weights=recv_w, config=config), args.iters,
                                  comm)
    results["recv_bytes"] = recv_x.numel() * recv_x.element_size()
    return results, handle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--num-sms", type=int, default=24)
    parser.add_argument("--ring", type=int, default=256, help="num_max_nvl_chunked_recv_tokens")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    report = {"device": torch.cuda.get_device_name(), "args": vars(args), "copy": copy_bandwidth(), "runs": []}
    print(f"device {report['device']}: copy {report['copy']['copy_GBps']:.0f} GB/s "
          f"({report['copy']['read_plus_write_GBps']:.0f} GB/s read+write)")
    for n in args.ranks:
        per_rank = run_ranks(bench_worker, n, args, timeout_s=240, env={"DEEP_EP_TIMEOUT_S": "60"})
        total_bytes = sum(r["recv_bytes"] for r in per_rank)
        row = {"ranks": n, "recv_bytes_total": total_bytes}
        for op in ("dispatch", "cached_dispatch", "combine"):
            t = max(r[f"{op}_s"] for r in per_rank)
            row[f"{op}_ms"] = t * 1e3
            row[f"{op}_GBps"] = total_bytes / t / 1e9
        report["runs"].append(row)
        print(f"{n} ranks on one GPU: " + ", ".join(
            f"{op} {row[f'{op}_ms']:.2f} ms = {row[f'{op}_GBps']:.1f} GB/s"
            for op in ("dispatch", "cached_dispatch", "combine")) + f" ({total_bytes / 1e6:.1f} MB received in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
