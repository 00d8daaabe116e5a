#!/usr/bin/env python3
"""DeepEP-style tuning sweeps for deep_ep's CUDA engine (intranode normal mode): chunk sizes x SM counts.

    python benchmarks/tune_cuda.py                                   # 8 GPUs, DeepEP's defaults
    python benchmarks/tune_cuda.py --num-ranks 4 --num-sms 16 24 32 --json benchmarks/results/cuda_tuning.json

Needs CUDA GPUs and the compiled core (``python build_core.py``). Without a GPU it prints why and
exits 0 without measuring; when the CUDA engine cannot run (core not built, GPUs that cannot map
each other's memory) it prints the engine's reason and exits 1.

What it does, per rank (one process per GPU, ``DEEP_EP_ENGINE=cuda``), like DeepEP's
``tests/test_intranode.py``:

1. builds DeepEP-like inputs (BF16 tokens, top-k of |randn|+1 scores, FP8 1x128 copy with
   column-major scales), and checks the CUDA engine's layout, dispatch (BF16) and combine against the
   global-view reference of ``benchmarks/bench_ep.py`` (every rank rebuilds all ranks' inputs);
2. dispatch sweep, FP8 then BF16: for every SM count of ``--num-sms`` and every
   ``num_max_nvl_chunked_send_tokens`` of ``--dispatch-chunks`` (default 4, 6, ..., 32):
   ``Config(num_sms, chunk, --nvl-recv-tokens)``; prints
   ``[tuning] SMs 24, NVL chunk 8: 153.21 GB/s (NVL), 412.5 us`` and the best config per SM count;
3. combine sweep: chunks ``--combine-chunks`` (default 1..16) for every SM count, on the handle of a
   dispatch with the same SM count (the handle's channel split follows ``num_sms``).

Bandwidth is DeepEP's: ``recv_x.numel() * 2`` bytes per rank (FP8 times ``(1 + 4/128) / 2``) over
the time; times are CUDA-event medians of ``--iters`` calls, slowest rank. Multi-node layouts run
on the portable engine, so there is no RDMA chunk sweep yet. Output: the lines above, a summary
table, ``--json`` and ``--plot`` (PNG: GB/s vs chunk size, one line per SM count; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bench_ep as ref  # noqa: E402
from common import (FP8_FACTOR, LaunchError, Progress, add_launch_args, launch, machine_info,  # noqa: E402
                    make_inputs, per_token_cast_to_fp8)


def _time_cuda(fn, group, device, warmup: int, iters: int) -> float:
    """Median seconds of one call (CUDA events; the wall clock in a CPU dry run), the slowest rank's."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)
    samples = []
    for _ in range(iters):
        if device.type != "cuda":
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def tune_worker(ctx, args) -> Dict[str, object]:
    import deep_ep
    rank, num_ranks, device = ctx.rank, ctx.num_ranks, ctx.device
    group, bench_group = ctx.group, ctx.bench_group
    max_sms = max(args.num_sms)
    hidden_bytes = args.hidden * 2
    chunks_recv = args.nvl_recv_tokens
    configs = [deep_ep.Config(sms, 1, chunks_recv) for sms in args.num_sms] + \
        [deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)]  # verification
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=(num_nvl_bytes + 127) // 128 * 128, explicitly_destroy=True)
    if buffer.engine != "cuda" and not args.cpu_dry_run:
        raise RuntimeError(f"the CUDA engine is not in use ({buffer.engine}): {buffer.engine_reason}")
    progress = None
    steps = len(args.num_sms) * (2 * len(args.dispatch_chunks) + len(args.combine_chunks))
    if rank == 0 and not args.no_progress and sys.stderr.isatty():  # the [tuning] lines already show progress
        progress = Progress(steps, "[tune]")
    out: Dict[str, object] = {"engine": buffer.engine, "engine_reason": buffer.engine_reason, "dispatch": [],
                              "combine": [], "max_sms": max_sms}
    try:
        all_inputs = [make_inputs(args.seed, s, args.num_tokens, args.hidden, args.num_experts, args.num_topk, 0)
                      for s in range(num_ranks)]
        inp = all_inputs[rank]
        x, topk_idx, topk_weights = (inp[k].to(device) for k in ("x", "topk_idx", "topk_weights"))
        q, s = per_token_cast_to_fp8(inp["x"])
        x_fp8 = (q.to(device), s.T.contiguous().T.to(device))
        layout = buffer.get_dispatch_layout(topk_idx, args.num_experts)
        per_rank, per_rdma, per_expert, is_in_rank, _ = layout
        ref.verify_layout(tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in layout), inp, num_ranks,
                          args.num_experts)

        def dispatch(xx, config):
            return buffer.dispatch(xx, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                   is_token_in_rank=is_in_rank, num_tokens_per_expert=per_expert,
                                   topk_idx=topk_idx, topk_weights=topk_weights, config=config)

        # ---- verification with DeepEP's default configs ----
        want = ref.normal_reference(all_inputs, rank, num_ranks, args.num_experts)
        res = dispatch(x, None)
        cpu = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in res[:4])
        handle_cpu = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in res[4])
        ref.verify_dispatch(cpu + (handle_cpu, None), want, num_ranks, rank, fp8=False)
        combined = buffer.combine(res[0], res[4], topk_weights=res[2])
        ref.verify_combine((combined[0].cpu(), combined[1].cpu(), None), inp, is_in_rank.cpu())
        recv_bytes = res[0].numel() * 2
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
        ctx.log(f"[tune] {num_ranks} ranks: layout, dispatch and combine verified on the {buffer.engine} engine "
                f"({where})")

        # ---- dispatch: FP8 then BF16, every SM count x NVL chunk ----
        for label, xx, nbytes in (("FP8", x_fp8, recv_bytes * FP8_FACTOR), ("BF16", x, recv_bytes)):
            for sms in args.num_sms:
                best = None
                for chunk in args.dispatch_chunks:
                    if chunk >= chunks_recv:
                        continue
                    config = deep_ep.Config(sms, chunk, chunks_recv)
                    t = _time_cuda(lambda: dispatch(xx, config), bench_group, device, args.warmup, args.iters)
                    gbs = nbytes / t / 1e9
                    out["dispatch"].append({"dtype": label, "num_sms": sms, "nvl_chunk": chunk, "time_us": t * 1e6,
                                            "GBps": gbs})
                    ctx.log(f"[tuning] {label} dispatch, SMs {sms}, NVL chunk {chunk}: {gbs:.2f} GB/s (NVL), "
                            f"{t * 1e6:.1f} us")
                    if best is None or gbs > best[0]:
                        best = (gbs, chunk, t)
                    if progress:
                        progress.step(f"{label} dispatch, SMs {sms}, chunk {chunk}")
                if best:
                    ctx.log(f"[tuning] best {label} dispatch for SMs {sms}: NVL chunk {best[1]}, {best[0]:.2f} GB/s "
                            f"(NVL), {best[2] * 1e6:.1f} us")

        # ---- combine: every SM count x NVL chunk, on a handle of the same SM count ----
        for sms in args.num_sms:
            recv_x, _, recv_w, _, handle, _ = dispatch(x, deep_ep.Config(sms, args.dispatch_chunks[0], chunks_recv))
            best = None
            for chunk in args.combine_chunks:
                if chunk >= chunks_recv:
                    continue
                config = deep_ep.Config(sms, chunk, chunks_recv)
                t = _time_cuda(lambda: buffer.combine(recv_x, handle, config=config), bench_group, device,
                               args.warmup, args.iters)
                gbs = recv_bytes / t / 1e9
                out["combine"].append({"dtype": "BF16", "num_sms": sms, "nvl_chunk": chunk, "time_us": t * 1e6,
                                       "GBps": gbs})
                ctx.log(f"[tuning] combine, SMs {sms}, NVL chunk {chunk}: {gbs:.2f} GB/s (NVL), {t * 1e6:.1f} us")
                if best is None or gbs > best[0]:
                    best = (gbs, chunk, t)
                if progress:
                    progress.step(f"combine, SMs {sms}, chunk {chunk}")
            if best:
                ctx.log(f"[tuning] best combine for SMs {sms}: NVL chunk {best[1]}, {best[0]:.2f} GB/s (NVL), "
                        f"{best[2] * 1e6:.1f} us")
        out["recv_bytes_rank0"] = recv_bytes
        dist.barrier(group=bench_group)
    finally:
        buffer.destroy()
    return out


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[tune] matplotlib is not installed: {sys.executable} -m pip install matplotlib", file=sys.stderr)
        return False
    panels = [("dispatch", "FP8"), ("dispatch", "BF16"), ("combine", "BF16")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (op, dtype) in zip(axes, panels):
        rows = [r for r in result[op] if r["dtype"] == dtype]
        for sms in sorted({r["num_sms"] for r in rows}):
            pts = sorted((r for r in rows if r["num_sms"] == sms), key=lambda r: r["nvl_chunk"])
            ax.plot([r["nvl_chunk"] for r in pts], [r["GBps"] for r in pts], marker="o", label=f"{sms} SMs")
        ax.set_title(f"{op} {dtype}")
        ax.set_xlabel("num_max_nvl_chunked_send_tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s per rank (NVL, DeepEP accounting)")
    axes[-1].legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"deep_ep CUDA engine tuning, {result['num_ranks']} ranks, {m.get('gpu', '?')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="DeepEP-style tuning of deep_ep's CUDA engine (intranode normal mode): dispatch (FP8, BF16) and "
                    "combine bandwidth for every NVL chunk size x SM count, after a correctness check. Needs CUDA "
                    "GPUs; without one it prints why and exits 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size (multiple of 128)")
    p.add_argument("--num-topk", type=int, default=8, help="experts per token")
    p.add_argument("--num-experts", type=int, default=256, help="experts in total (multiple of the rank count)")
    p.add_argument("--num-sms", type=int, nargs="+", default=[24],
                   help="SM counts to sweep (Config(num_sms=...); even numbers)")
    p.add_argument("--dispatch-chunks", type=int, nargs="+", default=list(range(4, 33, 2)),
                   help="num_max_nvl_chunked_send_tokens values for dispatch")
    p.add_argument("--combine-chunks", type=int, nargs="+", default=list(range(1, 17)),
                   help="num_max_nvl_chunked_send_tokens values for combine")
    p.add_argument("--nvl-recv-tokens", type=int, default=256, help="num_max_nvl_chunked_recv_tokens (ring size)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per config")
    p.add_argument("--iters", type=int, default=20, help="timed calls per config (median)")
    p.add_argument("--seed", type=int, default=1, help="input seed")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write GB/s vs chunk size (one line per SM count) as PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check this script on CPU: the same sweep on the portable engine (gloo ranks), which "
                        "ignores Config, so the numbers say nothing about chunk sizes or SMs; use tiny sizes")
    add_launch_args(p, default_ranks=torch.cuda.device_count() if torch.cuda.is_available() else 8,
                    with_device=False)
    args = p.parse_args(argv)
    if any(s % 2 for s in args.num_sms):
        p.error("--num-sms values must be even (one channel = two SMs)")
    if args.hidden % 128:
        p.error("--hidden must be a multiple of 128")
    args.device = "cpu" if args.cpu_dry_run else "cuda"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_dry_run:
        os.environ["DEEP_EP_ENGINE"] = "portable"
    else:
        if not torch.cuda.is_available():
            print("[tune] no CUDA device is visible (torch.cuda.is_available() is False): the CUDA engine's tuning "
                  "sweep needs GPUs, nothing was measured. CPU numbers: python benchmarks/sweep.py", file=sys.stderr)
            return 0
        if args.launch in ("auto", "spawn") and args.num_ranks > torch.cuda.device_count():
            print(f"[tune] note: {args.num_ranks} ranks on {torch.cuda.device_count()} GPU(s): ranks share GPUs "
                  "(time-sliced), so the numbers measure the kernels' cost, not the links", file=sys.stderr)
        os.environ["DEEP_EP_ENGINE"] = "cuda"
    try:
        out = launch(tune_worker, args, prefix="[tune]")
    except LaunchError as exc:
        print(f"\n[tune] FAILED (the CUDA engine could not run or a check failed)\n{exc}", file=sys.stderr)
        return 1
    if out is None:
        return 0
    result = {"meta": machine_info(args.device), "config": {k: v for k, v in vars(args).items()},
              "num_ranks": args.num_ranks, **out}
    print("\nbest configs (GB/s per rank, NVL, DeepEP accounting):")
    for op, dtype in (("dispatch", "FP8"), ("dispatch", "BF16"), ("combine", "BF16")):
        for sms in args.num_sms:
            rows = [r for r in out[op] if r["dtype"] == dtype and r["num_sms"] == sms]
            if rows:
                b = max(rows, key=lambda r: r["GBps"])
                print(f"  {op:<8} {dtype:<4} SMs {sms:>3}: NVL chunk {b['nvl_chunk']:>2}  {b['GBps']:8.2f} GB/s  "
                      f"{b['time_us']:8.1f} us")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"[tune] wrote {args.json}")
    if args.plot and plot(result, args.plot):
        print(f"[tune] wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
