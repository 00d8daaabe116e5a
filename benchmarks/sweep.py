#!/usr/bin/env python3
"""deep_ep sweeps: bandwidth vs tokens and ranks (normal mode), latency vs EP size (low-latency mode).

One command runs the whole sweep and writes a table (stdout), a JSON file and PNG plots::

    python benchmarks/sweep.py --out benchmarks/results          # the committed CPU results (~3-5 min)

What a point measures
---------------------
Normal mode, for every rank count in ``--ranks`` (plus every ``RANKS:PER_NODE`` layout in
``--multinode``: deep_ep's multi-node layout on one machine through ``DEEP_EP_RANKS_PER_NODE``) and
every token count in ``--tokens``: ``dispatch`` BF16 and FP8 and ``combine`` BF16 of deep_ep, next to
the two baselines of the main job on a separate group of the same ranks (``raw all_to_all_single`` of
exactly the BF16 dispatch's bytes; the naive one-row-per-(token, expert) dispatcher). Before timing,
every point checks dispatch and combine against the global-view reference of ``bench_ep.py``.

Low-latency mode, for every EP size in ``--ll-ranks`` and token count in ``--ll-tokens``:
``low_latency_dispatch`` BF16 and FP8 and ``low_latency_combine``, next to a raw
``all_to_all_single`` of the BF16 dispatch's bytes (one row per (token, expert) selection, as the
low-latency wire format sends them). Verified first, like the main job.

Timing and bytes are the main job's (``benchmarks/common.py``): median over rounds of the slowest
rank, ops run round-robin; DeepEP's byte accounting (``recv_x.numel() * 2`` per rank for normal
mode, FP8 times ``(1 + 4/128) / 2``; per selection ``hidden * 2`` or ``hidden + hidden/128*4 + 16``
in low-latency mode). Multi-node layouts also report DeepEP's RDMA bytes (one row per (token,
destination node) pair, the local node included).

Plots (need matplotlib, imported only to draw; ``pip install matplotlib``):
``<name>_normal_bw_vs_tokens.png``, ``<name>_normal_bw_vs_ranks.png``, ``<name>_ll_latency_vs_ep.png``.
``--plot-only FILE.json`` redraws them from a JSON file without measuring.

Engines: on CPU tensors deep_ep uses its portable engine. ``--device cuda`` puts the tensors on the
GPUs (local rank % device count) so that deep_ep picks its CUDA engine where it can run (the JSON and
the table name the engine of every point); without a GPU it stops with a message. Several machines:
``--launch env`` (one launch per node) or ``--launch mpirun``; the sweep over ranks is then the
launched world size only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bench_ep as ref  # noqa: E402  (references and checks of the main job)
from common import (FP8_FACTOR, LaunchError, NaiveDispatcher, Progress, RawAllToAll,  # noqa: E402
                    add_launch_args, bench_round_robin, launch, ll_bytes, machine_info, make_inputs,
                    mean_over_ranks, normal_buffer_bytes, normal_bytes, per_token_cast_to_fp8, rdma_token_count,
                    resolve_device, resolve_launch)

NORMAL_OPS = ("dispatch BF16", "dispatch FP8", "combine BF16", "raw all_to_all_single", "naive dispatcher")
SHORT = {"raw all_to_all_single": "raw all-to-all", "naive dispatcher": "naive", "LL dispatch BF16": "dispatch BF16",
         "LL dispatch FP8": "dispatch FP8", "LL combine BF16": "combine BF16"}
LL_OPS = ("LL dispatch BF16", "LL dispatch FP8", "LL combine BF16", "raw all_to_all_single")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def to_cpu(obj):
    """Tensors (also inside tuples/lists) moved to CPU, for the CPU references."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cpu(o) for o in obj)
    return obj


def _summary(times: Dict[str, dict], byte_counts: Dict[str, float]) -> Dict[str, dict]:
    out = {}
    for name, t in times.items():
        nbytes = byte_counts.get(name)
        out[name] = {"median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "max_ms": t["max_s"] * 1e3,
                     "bytes_per_rank": nbytes, "GBps": (nbytes / t["median_s"] / 1e9) if nbytes else None}
    return out


def _progress(ctx, args) -> Optional[Progress]:
    if ctx.rank != 0 or args.no_progress:
        return None
    return Progress(args._progress_total, "[sweep]", done=args._progress_done, start=args._progress_start)


# ------------------------------------------------------------------------------------------------
# Normal mode: one launch per (ranks, layout); every token count inside it
# ------------------------------------------------------------------------------------------------
def normal_worker(ctx, args) -> List[dict]:
    import deep_ep
    rank, num_ranks, device = ctx.rank, ctx.num_ranks, ctx.device
    experts_per_rank = args.num_experts // num_ranks
    progress = _progress(ctx, args)
    rows = []
    num_nvl_bytes, num_rdma_bytes = normal_buffer_bytes(deep_ep, num_ranks, ctx.num_local_ranks, args.hidden * 2)
    buffer = deep_ep.Buffer(ctx.group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                            explicitly_destroy=True)
    try:
        rpn = getattr(buffer, "num_ranks_per_node", None) or num_ranks
        for tokens in args.tokens:
            all_inputs = [make_inputs(args.seed, s, tokens, args.hidden, args.num_experts, args.num_topk, 0)
                          for s in range(num_ranks)]
            inp = all_inputs[rank]
            x, topk_idx, topk_weights = (inp[k].to(device) for k in ("x", "topk_idx", "topk_weights"))
            x_fp8 = per_token_cast_to_fp8(inp["x"])
            x_fp8 = (x_fp8[0].to(device), x_fp8[1].T.contiguous().T.to(device))  # column-major scales, as DeepEP
            layout = buffer.get_dispatch_layout(topk_idx, args.num_experts)
            per_rank, per_rdma, per_expert, is_in_rank, _ = layout

            def dispatch(xx):
                return buffer.dispatch(xx, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                       is_token_in_rank=is_in_rank, num_tokens_per_expert=per_expert,
                                       topk_idx=topk_idx, topk_weights=topk_weights)

            # ---- verification (BF16 dispatch and combine, against the global view) ----
            want = ref.normal_reference(all_inputs, rank, num_ranks, args.num_experts)
            result = dispatch(x)
            ref.verify_dispatch(to_cpu(result[:5]) + (None,), want, num_ranks, rank, fp8=False)
            recv_x, _, recv_w, _, handle, _ = result
            combined = buffer.combine(recv_x, handle, topk_weights=recv_w)
            ref.verify_combine(to_cpu(combined[:2]) + (None,), inp, to_cpu(is_in_rank))
            naive = NaiveDispatcher(ctx.bench_group, num_ranks, args.num_experts)
            raw = RawAllToAll(ctx.bench_group, per_rank.tolist(), want["counts_from"], args.hidden, device)

            ops = {
                "raw all_to_all_single": raw,
                "dispatch BF16": lambda: dispatch(x),
                "naive dispatcher": lambda: naive(x, topk_idx),
                "dispatch FP8": lambda: dispatch(x_fp8),
                "combine BF16": lambda: buffer.combine(recv_x, handle),
            }
            times = bench_round_robin(ops, ctx.bench_group, args.warmup, args.iters, device=device)
            recv_bytes = mean_over_ranks(normal_bytes(recv_x.shape[0], args.hidden), ctx.bench_group, device)
            byte_counts = {"dispatch BF16": recv_bytes, "dispatch FP8": recv_bytes * FP8_FACTOR,
                           "combine BF16": recv_bytes, "raw all_to_all_single": recv_bytes,
                           "naive dispatcher": recv_bytes}
            row = {"mode": "normal", "ranks": num_ranks, "ranks_per_node": rpn, "nodes": num_ranks // rpn,
                   "tokens": tokens, "hidden": args.hidden, "num_topk": args.num_topk,
                   "num_experts": args.num_experts, "engine": str(getattr(buffer, "engine", "?")),
                   "recv_tokens_per_rank": recv_bytes / (args.hidden * 2), "ops": _summary(times, byte_counts)}
            if num_ranks // rpn > 1:
                rdma = mean_over_ranks(rdma_token_count(inp["topk_idx"], experts_per_rank, rpn) * args.hidden * 2,
                                       ctx.bench_group, device)
                row["rdma_bytes_per_rank"] = rdma
                row["dispatch_BF16_rdma_GBps"] = rdma / times["dispatch BF16"]["median_s"] / 1e9
            rows.append(row)
            if progress:
                progress.step(f"normal {num_ranks} ranks{f' ({rpn}/node)' if rpn != num_ranks else ''}, "
                              f"{tokens} tokens")
            dist.barrier(group=ctx.bench_group)
    finally:
        buffer.destroy()
    return rows


# ------------------------------------------------------------------------------------------------
# Low-latency mode: one launch per EP size; every token count inside it
# ------------------------------------------------------------------------------------------------
def ll_worker(ctx, args) -> List[dict]:
    import deep_ep
    rank, num_ranks, device = ctx.rank, ctx.num_ranks, ctx.device
    experts_per_rank = args.num_experts // num_ranks
    progress = _progress(ctx, args)
    max_tokens = max(args.ll_tokens)
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, args.hidden, num_ranks,
                                                                     args.num_experts)
    buffer = deep_ep.Buffer(ctx.group, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=max(1, experts_per_rank), explicitly_destroy=True)
    rows = []
    try:
        for tokens in args.ll_tokens:
            all_inputs = [make_inputs(args.seed + 7, s, tokens, args.hidden, args.num_experts, args.num_topk,
                                      min(args.ll_masked, tokens * args.num_topk)) for s in range(num_ranks)]
            inp = all_inputs[rank]
            x, topk_idx, topk_weights = (inp[k].to(device) for k in ("x", "topk_idx", "topk_weights"))

            def ll_dispatch(use_fp8):
                return buffer.low_latency_dispatch(x, topk_idx, max_tokens, args.num_experts, use_fp8=use_fp8,
                                                   async_finish=False, return_recv_hook=False)

            def ll_combine(expert_out, handle):
                return buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)[0]

            # ---- verification ----
            blocks = ref.ll_reference(all_inputs, rank, num_ranks, args.num_experts)
            result = ll_dispatch(False)
            ref.verify_ll_dispatch(to_cpu(result[:3]) + (None, None), blocks, all_inputs, rank, num_ranks, False)
            combined = ll_combine(result[0], result[2])
            ref.verify_ll_combine(combined.cpu(), inp, False)

            # Raw baseline: the BF16 rows of every valid selection, per (src, dst) pair, in one all-to-all.
            dst = torch.where(inp["topk_idx"] >= 0, inp["topk_idx"] // experts_per_rank,
                              torch.full_like(inp["topk_idx"], -1))
            send_rows = torch.bincount(dst[dst >= 0], minlength=num_ranks).tolist()
            recv_rows = [int(((a["topk_idx"] >= 0) & (a["topk_idx"] // experts_per_rank == rank)).sum())
                         for a in all_inputs]
            raw = RawAllToAll(ctx.bench_group, send_rows, recv_rows, args.hidden, device)
            state = {}

            def op_dispatch_bf16():
                state["bf16"] = ll_dispatch(False)

            def op_combine():
                res = state["bf16"]
                ll_combine(res[0], res[2])

            ops = {"raw all_to_all_single": raw, "LL dispatch BF16": op_dispatch_bf16, "LL combine BF16": op_combine,
                   "LL dispatch FP8": lambda: ll_dispatch(True)}
            times = bench_round_robin(ops, ctx.bench_group, args.warmup, args.iters, device=device)
            selections = int((inp["topk_idx"] >= 0).sum())
            bf16 = mean_over_ranks(ll_bytes(selections, args.hidden, False), ctx.bench_group, device)
            fp8 = mean_over_ranks(ll_bytes(selections, args.hidden, True), ctx.bench_group, device)
            byte_counts = {"LL dispatch BF16": bf16, "LL dispatch FP8": fp8, "LL combine BF16": bf16,
                           "raw all_to_all_single": bf16}
            rows.append({"mode": "low_latency", "ranks": num_ranks, "tokens": tokens, "max_tokens": max_tokens,
                         "hidden": args.hidden, "num_topk": args.num_topk, "num_experts": args.num_experts,
                         "engine": str(getattr(buffer, "engine", "?")), "ops": _summary(times, byte_counts)})
            if progress:
                progress.step(f"low-latency EP {num_ranks}, {tokens} tokens")
            dist.barrier(group=ctx.bench_group)
    finally:
        buffer.destroy()
    return rows


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def _cell(op: Optional[dict]) -> str:
    if not op:
        return f"{'-':>17}"
    gbs = f"{op['GBps']:.3f}" if op.get("GBps") else "-"
    return f"{op['median_ms']:9.2f} {gbs:>7}"


def print_tables(result: dict) -> None:
    normal = result.get("normal") or []
    if normal:
        print("\nnormal mode (time ms, GB/s per rank with DeepEP's accounting; median of rounds, slowest rank; "
              "baselines move the BF16 dispatch's bytes)")
        head = f"{'ranks':>5} {'nodes':>5} {'tokens':>6} {'engine':>8} " + " ".join(
            f"{SHORT.get(n, n):>17}" for n in NORMAL_OPS) + f" {'vs raw':>7} {'vs naive':>8}"
        print(head)
        print("-" * len(head))
        for r in normal:
            ops = r["ops"]
            d = ops["dispatch BF16"]["median_ms"]
            print(f"{r['ranks']:>5} {r['nodes']:>5} {r['tokens']:>6} {r['engine']:>8} "
                  + " ".join(_cell(ops.get(n)) for n in NORMAL_OPS)
                  + f" {ops['raw all_to_all_single']['median_ms'] / d:6.2f}x {ops['naive dispatcher']['median_ms'] / d:7.2f}x")
        print("  vs raw / vs naive: baseline time / dispatch BF16 time (> 1: deep_ep is faster)")
    ll = result.get("low_latency") or []
    if ll:
        print("\nlow-latency mode (latency us per call, GB/s per rank with DeepEP's accounting; raw all-to-all moves "
              "the BF16 dispatch's bytes)")
        head = f"{'EP':>4} {'tokens':>6} {'engine':>8} " + " ".join(f"{SHORT.get(n, n):>20}" for n in LL_OPS)
        print(head)
        print("-" * len(head))
        for r in ll:
            cells = []
            for n in LL_OPS:
                op = r["ops"][n]
                cells.append(f"{op['median_ms'] * 1e3:8.0f} us {op['GBps']:6.3f}".rjust(20))
            print(f"{r['ranks']:>4} {r['tokens']:>6} {r['engine']:>8} " + " ".join(cells))


def markdown_tables(result: dict) -> str:
    """The sweep as Markdown tables (for the README): normal mode in GB/s per rank (dispatch BF16 also in
    ms); low-latency mode in ms per call."""
    lines = []
    normal = result.get("normal") or []
    if normal:
        lines += ["| ranks | nodes | tokens/rank | dispatch BF16 | dispatch FP8 | combine BF16 | raw all-to-all | naive "
                  "| dispatch vs raw | dispatch vs naive |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in normal:
            ops = r["ops"]
            d = ops["dispatch BF16"]["median_ms"]
            cells = [f"{ops['dispatch BF16']['GBps']:.2f} ({d:.0f} ms)"] + \
                [f"{ops[n]['GBps']:.2f}" for n in NORMAL_OPS[1:]]
            lines.append(f"| {r['ranks']} | {r['nodes']} | {r['tokens']} | " + " | ".join(cells)
                         + f" | {ops['raw all_to_all_single']['median_ms'] / d:.2f}x"
                         + f" | {ops['naive dispatcher']['median_ms'] / d:.2f}x |")
    ll = result.get("low_latency") or []
    if ll:
        if lines:
            lines.append("")
        lines += ["| EP size | tokens/rank | dispatch BF16 | dispatch FP8 | combine BF16 | raw all-to-all (BF16 bytes) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in ll:
            cells = [f"{r['ops'][n]['median_ms']:.1f} ms" for n in LL_OPS]
            lines.append(f"| {r['ranks']} | {r['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[sweep] matplotlib is not installed, so no PNG plots were written. Install it into this "
              f"environment ({sys.executable} -m pip install matplotlib) and redraw from the JSON with "
              "`python benchmarks/sweep.py --plot-only FILE.json`.", file=sys.stderr)
        return None
    return plt


_STYLE = {"dispatch BF16": ("C0", "o", "-"), "dispatch FP8": ("C0", "s", "--"), "combine BF16": ("C1", "^", "-"),
          "raw all_to_all_single": ("C2", "x", ":"), "naive dispatcher": ("C3", "v", ":"),
          "LL dispatch BF16": ("C0", "o", "-"), "LL dispatch FP8": ("C0", "s", "--"),
          "LL combine BF16": ("C1", "^", "-")}


def _caption(result: dict) -> str:
    m = result["meta"]
    c = result["config"]
    where = f"{m['cpus']}-core {m['host_cpu']}" + (f", {m['gpu']}" if m.get("gpu") else ", CPU tensors, gloo")
    return (f"{m['date_utc']}, {where}, torch {m['torch']}, load avg {m['load_average_1_5_15']}\n"
            f"hidden {c['hidden']}, top-{c['num_topk']} of {c['num_experts']} experts, median of {c['iters']} rounds "
            f"(slowest rank); {m['command']}")


def plot(result: dict, out_dir: str, name: str) -> List[str]:
    plt = _import_pyplot()
    if plt is None:
        return []
    written = []
    normal = result.get("normal") or []
    if normal:
        layouts = sorted({(r["ranks"], r["nodes"]) for r in normal})
        ncols = len(layouts) if len(layouts) <= 3 else (len(layouts) + 1) // 2
        nrows = (len(layouts) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows + 0.6), sharey=True, squeeze=False)
        flat_axes = [a for row in axes for a in row]
        for ax in flat_axes[len(layouts):]:
            ax.set_visible(False)
        for ax, (nr, nn) in zip(flat_axes, layouts):
            pts = sorted((r for r in normal if (r["ranks"], r["nodes"]) == (nr, nn)), key=lambda r: r["tokens"])
            for op in NORMAL_OPS:
                color, marker, ls = _STYLE[op]
                ax.plot([r["tokens"] for r in pts], [r["ops"][op]["GBps"] for r in pts], color=color,
                        marker=marker, linestyle=ls, label=op)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["tokens"] for r in pts])
            ax.set_xticklabels([str(r["tokens"]) for r in pts])
            ax.minorticks_off()
            ax.set_title(f"{nr} ranks" + (f", multi-node layout: {nn} nodes of {nr // nn}" if nn > 1 else ", one node"),
                         fontsize=10)
            ax.set_xlabel("tokens per rank")
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("GB/s per rank (DeepEP accounting)")
        flat_axes[0].legend(fontsize=7)
        fig.suptitle(f"deep_ep normal mode, {normal[0]['engine']} engine: bandwidth vs tokens per rank", fontsize=11)
        fig.text(0.5, 0.005, _caption(result), ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = os.path.join(out_dir, f"{name}_normal_bw_vs_tokens.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        one_node = [r for r in normal if r["nodes"] == 1]
        if one_node:
            tokens = max(r["tokens"] for r in one_node)
            pts = sorted((r for r in one_node if r["tokens"] == tokens), key=lambda r: r["ranks"])
            multi = [r for r in normal if r["nodes"] > 1 and r["tokens"] == tokens]
            fig, ax = plt.subplots(figsize=(6.0, 4.4))
            for op in NORMAL_OPS:
                color, marker, ls = _STYLE[op]
                ax.plot([r["ranks"] for r in pts], [r["ops"][op]["GBps"] for r in pts], color=color, marker=marker,
                        linestyle=ls, label=op)
            for r in multi:
                ax.scatter([r["ranks"]], [r["ops"]["dispatch BF16"]["GBps"]], marker="*", s=120, color="C4", zorder=5,
                           label=f"dispatch BF16, {r['nodes']} nodes of {r['ranks_per_node']}")
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["ranks"] for r in pts])
            ax.set_xticklabels([str(r["ranks"]) for r in pts])
            ax.minorticks_off()
            ax.set_xlabel("ranks (EP size)")
            ax.set_ylabel("GB/s per rank (DeepEP accounting)")
            ax.set_title(f"deep_ep normal mode, {normal[0]['engine']} engine:\nbandwidth vs ranks, {tokens} tokens/rank",
                         fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.text(0.5, 0.005, _caption(result), ha="center", fontsize=5.5)
            fig.tight_layout(rect=(0, 0.06, 1, 1))
            path = os.path.join(out_dir, f"{name}_normal_bw_vs_ranks.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    ll = result.get("low_latency") or []
    if ll:
        token_counts = sorted({r["tokens"] for r in ll})
        # Microseconds as DeepEP reports them; milliseconds when the calls take that long (CPU).
        slow = max(r["ops"][op]["median_ms"] for r in ll for op in LL_OPS) > 5
        unit, scale = ("ms", 1.0) if slow else ("us", 1e3)
        fig, ax = plt.subplots(figsize=(6.0, 4.4))
        for i, tokens in enumerate(token_counts):
            pts = sorted((r for r in ll if r["tokens"] == tokens), key=lambda r: r["ranks"])
            for op in LL_OPS:
                color, marker, ls = _STYLE.get(op, ("C2", "x", ":"))
                label = op + (f", {tokens} tokens" if len(token_counts) > 1 else "")
                ax.plot([r["ranks"] for r in pts], [r["ops"][op]["median_ms"] * scale for r in pts], color=color,
                        marker=marker, linestyle=ls, alpha=1.0 - 0.4 * i / max(1, len(token_counts) - 1) if
                        len(token_counts) > 1 else 1.0, label=label)
        eps = sorted({r["ranks"] for r in ll})
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps)
        ax.set_xticklabels([str(e) for e in eps])
        ax.set_xlabel("EP size (ranks)")
        ax.set_ylabel(f"latency per call ({unit}, slowest rank, median)")
        ax.set_ylim(bottom=0)
        ax.minorticks_off()
        ax.set_title(f"deep_ep low-latency mode, {ll[0]['engine']} engine:\nlatency vs EP size"
                     + (f", {token_counts[0]} tokens/rank" if len(token_counts) == 1 else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.text(0.5, 0.005, _caption(result), ha="center", fontsize=5.5)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = os.path.join(out_dir, f"{name}_ll_latency_vs_ep.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _layout(text: str) -> Tuple[int, int]:
    try:
        ranks, per_node = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANKS:RANKS_PER_NODE, e.g. 4:2, got {text!r}") from None
    if ranks % per_node != 0 or per_node >= ranks:
        raise argparse.ArgumentTypeError(f"{text}: RANKS_PER_NODE must divide RANKS and be smaller")
    return ranks, per_node


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Sweep deep_ep over tokens and ranks (normal mode: bandwidth; low-latency mode: latency vs EP "
                    "size), next to a raw all_to_all_single of the same bytes and a naive per-(token, expert) "
                    "dispatcher. Every point is verified before it is timed. Writes a table, JSON and PNG plots.",
        epilog="Examples:\n"
               "  python benchmarks/sweep.py --out benchmarks/results            # the committed CPU sweep\n"
               "  python benchmarks/sweep.py --mode ll --ll-ranks 2 4 8 16       # latency vs EP size only\n"
               "  python benchmarks/sweep.py --device cuda --ranks 2 4 8 --tokens 1024 4096 --hidden 7168 "
               "--name gpu\n"
               "  python benchmarks/sweep.py --plot-only benchmarks/results/cpu_sweep.json\n"
               "  # two machines, one launch on each (node index 0 and 1):\n"
               "  MASTER_ADDR=host0 MASTER_PORT=29500 WORLD_SIZE=2 RANK=0 python benchmarks/sweep.py --num-ranks 8\n"
               "  mpirun -np 8 python benchmarks/sweep.py --launch mpirun",
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=36))
    p.add_argument("--mode", choices=("all", "normal", "ll"), default="all", help="which sweeps to run (default all)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8],
                   help="normal mode: rank counts, one node each (default 2 4 8; spawn launch only)")
    p.add_argument("--multinode", type=_layout, nargs="*", default=[(4, 2)], metavar="RANKS:PER_NODE",
                   help="normal mode: multi-node layouts emulated on this machine with DEEP_EP_RANKS_PER_NODE "
                        "(default 4:2 = two nodes of two ranks; give none to skip)")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048],
                   help="normal mode: tokens per rank (default 256 512 1024 2048)")
    p.add_argument("--ll-ranks", type=int, nargs="+", default=[2, 4, 8],
                   help="low-latency mode: EP sizes (default 2 4 8; spawn launch only)")
    p.add_argument("--ll-tokens", type=int, nargs="+", default=[128],
                   help="low-latency mode: tokens per rank; the largest is num_max_dispatch_tokens_per_rank "
                        "(default 128)")
    p.add_argument("--ll-masked", type=int, default=10, help="(token, slot) entries set to -1 per rank in "
                                                              "low-latency mode, as DeepEP's test (default 10)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size, a multiple of 128 (default 2048)")
    p.add_argument("--num-topk", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--num-experts", type=int, default=64,
                   help="experts in total, a multiple of every rank count (default 64)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per point (default 1)")
    p.add_argument("--iters", type=int, default=7, help="timed rounds per point; the median is reported (default 7)")
    p.add_argument("--seed", type=int, default=1, help="input seed (default 1)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"),
                   help="directory for the JSON and PNG files (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file name prefix (default: the device, e.g. cpu)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown (for the README)")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plots (and the table) from a sweep JSON; "
                                                       "measures nothing")
    add_launch_args(p, default_ranks=4)
    args = p.parse_args(argv)
    if args.hidden % 128 != 0:
        p.error("--hidden must be a multiple of 128")
    counts = set(args.ranks) | {r for r, _ in args.multinode} | set(args.ll_ranks)
    bad = sorted(n for n in counts if args.num_experts % n != 0)
    if bad and resolve_launch(args) == "spawn":
        p.error(f"--num-experts {args.num_experts} is not a multiple of the rank counts {bad}")
    if not 1 <= args.num_topk <= args.num_experts:
        p.error("--num-topk must be in [1, --num-experts]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as f:
            result = json.load(f)
        print_tables(result)
        if args.markdown:
            print("\n" + markdown_tables(result))
        name = args.name or os.path.basename(args.plot_only).replace("_sweep.json", "").replace(".json", "")
        for path in plot(result, os.path.dirname(os.path.abspath(args.plot_only)), name):
            print(f"[sweep] wrote {path}")
        return 0
    device = resolve_device(args)
    if device == "cuda" and not torch.cuda.is_available():
        print("[sweep] --device cuda: no CUDA device is visible (torch.cuda.is_available() is False); nothing "
              "to measure. Run on a GPU machine, or use --device cpu.", file=sys.stderr)
        return 0
    kind = resolve_launch(args)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or device
    meta = machine_info(device)
    meta["launch"] = kind
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("plot_only",)}
    config["multinode"] = [f"{r}:{n}" for r, n in args.multinode]

    # One launch per (ranks, layout): spawn sweeps the rank counts; env/mpirun run the launched world once.
    jobs = []
    if args.mode in ("all", "normal"):
        if kind == "spawn":
            jobs += [("normal", n, 0) for n in args.ranks] + [("normal", n, k) for n, k in args.multinode]
        else:
            jobs.append(("normal", None, args.ranks_per_node))
    if args.mode in ("all", "ll"):
        jobs += [("ll", n, 0) for n in args.ll_ranks] if kind == "spawn" else [("ll", None, args.ranks_per_node)]
    total = sum(len(args.tokens) if mode == "normal" else len(args.ll_tokens) for mode, _, _ in jobs)
    print(f"[sweep] {len(jobs)} launches, {total} points ({kind} launch, {device}); results -> {args.out}",
          flush=True)
    start = time.time()
    done = 0
    user_rpn = os.environ.get("DEEP_EP_RANKS_PER_NODE")
    hosts_rank0 = True
    result = {"meta": meta, "config": config, "normal": [], "low_latency": []}
    for mode, ranks, per_node in jobs:
        job_args = copy.copy(args)
        if ranks is not None:
            job_args.num_ranks = ranks
        job_args.ranks_per_node = per_node
        job_args._progress_total, job_args._progress_done, job_args._progress_start = total, done, start
        worker = normal_worker if mode == "normal" else ll_worker
        try:
            rows = launch(worker, job_args, prefix="[sweep]", quiet=True)
        except LaunchError as exc:
            print(f"\n[sweep] FAILED ({mode}, {ranks} ranks, {per_node or 'one node'} per node)\n{exc}",
                  file=sys.stderr)
            return 1
        done += len(args.tokens) if mode == "normal" else len(args.ll_tokens)
        if rows is None:  # not the process hosting rank 0 (env/mpirun): it only takes part
            hosts_rank0 = False
            continue
        result["normal" if mode == "normal" else "low_latency"].extend(rows)
        # The next launch starts from the caller's environment (launch() exported DEEP_EP_RANKS_PER_NODE).
        if user_rpn is None:
            os.environ.pop("DEEP_EP_RANKS_PER_NODE", None)
        else:
            os.environ["DEEP_EP_RANKS_PER_NODE"] = user_rpn
    if not hosts_rank0:
        print("[sweep] done; rank 0's host writes the results")
        return 0
    meta["wall_s"] = round(time.time() - start, 1)
    meta["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print_tables(result)
    if args.markdown:
        print("\n" + markdown_tables(result))
    path = os.path.join(args.out, f"{name}_sweep.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"\n[sweep] wrote {path} ({meta['wall_s']} s)")
    if not args.no_plots:
        for p in plot(result, args.out, name):
            print(f"[sweep] wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
