"""Rank program for tests/test_mpi.py: run it under ``mpirun -np N python tests/mpi_script.py [MODE ...]``.

Modes (default: both, in this order, in one MPI job):
  ``comm``  -- ``deep_ep.Buffer(None, comm=MPI.COMM_WORLD)``; torch.distributed is never initialised.
  ``torch`` -- a gloo process group initialised from MPI (rank/size from COMM_WORLD, a free port chosen
               by rank 0 and broadcast with mpi4py), then ``deep_ep.Buffer(dist.group.WORLD)``.

In both modes every rank runs get_dispatch_layout + dispatch + combine and low_latency_dispatch +
low_latency_combine on small random inputs and checks each result against a global-view reference
(every rank rebuilds all ranks' inputs from one shared seed). It prints ``OK rank R of N mode MODE``
on success; on any failure it prints the traceback and aborts the whole MPI job (exit code != 0).
"""

import contextlib
import os
import socket
import sys
import traceback
from datetime import timedelta

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mpi4py import MPI  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

NUM_TOKENS = 37          # odd on purpose
HIDDEN = 256             # a multiple of 128 (low-latency requirement)
NUM_EXPERTS_PER_RANK = 3
NUM_TOPK = 4
NUM_MASKED = 5           # (token, slot) entries set to -1 per rank
LL_MAX_TOKENS = 40       # num_max_dispatch_tokens_per_rank


def make_inputs(seed, src, num_experts):
    gen = torch.Generator().manual_seed(seed * 7919 + src)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16)
    scores = torch.randn(NUM_TOKENS, num_experts, generator=gen).abs() + 1
    topk_idx = torch.topk(scores, NUM_TOPK, dim=-1).indices.to(torch.int64)
    masked = torch.randperm(NUM_TOKENS * NUM_TOPK, generator=gen)[:NUM_MASKED]
    topk_idx.view(-1)[masked] = -1
    weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen) + 0.1
    return x, topk_idx, weights


def expect_equal(got, want, what):
    if got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError(f"{what}: got {got.tolist() if got.numel() < 64 else got.shape}, "
                             f"expected {want.tolist() if want.numel() < 64 else want.shape}")


def check_normal(buffer, rank, num_ranks, inputs, num_experts):
    epr = num_experts // num_ranks
    x, topk_idx, weights = inputs[rank]

    # get_dispatch_layout
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    valid = topk_idx >= 0
    ref_in_rank = torch.zeros(NUM_TOKENS, num_ranks, dtype=torch.bool)
    pairs = valid.nonzero()
    ref_in_rank[pairs[:, 0], topk_idx[pairs[:, 0], pairs[:, 1]] // epr] = True
    expect_equal(in_rank, ref_in_rank, "is_token_in_rank")
    expect_equal(per_rank.to(torch.int64), ref_in_rank.sum(0), "num_tokens_per_rank")
    expect_equal(per_expert.to(torch.int64), torch.bincount(topk_idx[valid], minlength=num_experts),
                 "num_tokens_per_expert")

    # dispatch: rows grouped by source rank, source order inside a group
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights)
    want_x, want_idx, want_w = [], [], []
    want_counts = [0] * epr
    for sx, sidx, sw in inputs:
        mine = (sidx >= 0) & (sidx // epr == rank)
        rows = mine.any(1).nonzero().view(-1)
        want_x.append(sx[rows])
        want_idx.append(torch.where(mine, sidx - rank * epr, torch.full_like(sidx, -1))[rows])
        want_w.append(torch.where(mine, sw, torch.zeros_like(sw))[rows])
        for j, c in enumerate(torch.bincount(sidx[mine] - rank * epr, minlength=epr).tolist()):
            want_counts[j] += c
    expect_equal(recv_x, torch.cat(want_x), "dispatch recv_x")
    expect_equal(recv_idx.to(torch.int64), torch.cat(want_idx), "dispatch recv_topk_idx")
    expect_equal(recv_w, torch.cat(want_w), "dispatch recv_topk_weights")
    if list(per_expert_list) != want_counts:
        raise AssertionError(f"num_recv_tokens_per_expert_list {list(per_expert_list)}, expected {want_counts}")

    # combine: each token comes back once from every rank it went to (plain sum)
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    want = (x.float() * ref_in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16)
    expect_equal(combined, want, "combine combined_x")
    expect_equal(combined_w, torch.where(valid, weights, torch.zeros_like(weights)), "combine topk_weights")


def check_low_latency(buffer, rank, num_ranks, inputs, num_experts):
    epr = num_experts // num_ranks
    x, topk_idx, weights = inputs[rank]
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, LL_MAX_TOKENS, num_experts, use_fp8=False)
    src_info, layout_range = handle[0], handle[1]
    for j in range(epr):
        expert = rank * epr + j
        total = 0
        for s, (sx, sidx, _sw) in enumerate(inputs):
            want_tokens = (sidx == expert).nonzero()[:, 0]
            packed = int(layout_range[j, s])
            begin, count = packed >> 32, packed & 0xFFFFFFFF
            if count != want_tokens.numel():
                raise AssertionError(f"LL expert {j} source {s}: count {count}, expected {want_tokens.numel()}")
            got_tokens = src_info[j, begin:begin + count].to(torch.int64)
            expect_equal(torch.sort(got_tokens).values, want_tokens, f"LL expert {j} source {s} src_info")
            expect_equal(recv_x[j, begin:begin + count], sx[got_tokens], f"LL expert {j} source {s} rows")
            total += count
        if int(recv_count[j]) != total:
            raise AssertionError(f"LL recv_count[{j}] = {int(recv_count[j])}, expected {total}")

    # combine with the received rows as the expert output: x * sum of the valid weights
    combined = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)[0]
    want = x.float() * torch.where(topk_idx >= 0, weights, torch.zeros_like(weights)).sum(1, keepdim=True)
    err = (combined.float() - want).abs().max().item()
    tol = 2e-2 * max(1.0, want.abs().max().item())
    if err > tol:
        raise AssertionError(f"LL combine: max |diff| {err:.4g} > {tol:.4g}")


def free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_faults(buffer, rank, num_ranks, inputs, num_experts):
    """Issue 14 under mpirun: a rank that passes another dtype, or an out-of-range expert id, makes every rank
    raise the same clear ValueError before any data moves, and the Buffer stays usable."""
    x, topk_idx, weights = inputs[rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    last = num_ranks - 1
    for kind in ("dtype", "local"):
        arg_x, arg_idx = x, topk_idx
        if rank == last and kind == "dtype":
            arg_x = x.to(torch.float16)
        if rank == last and kind == "local":
            arg_idx = topk_idx.clone()
            arg_idx[0, 0] = num_experts + 3
        try:
            buffer.dispatch(arg_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=arg_idx, topk_weights=weights)
        except ValueError as exc:
            text = str(exc)
        else:
            raise AssertionError(f"{kind}: no error on rank {rank}")
        want = "the dtype of `x`" if kind == "dtype" else \
            ("`topk_idx` holds expert ids outside" if rank == last else f"rank {last} raised ValueError")
        if want not in text:
            raise AssertionError(f"{kind}: rank {rank} raised {text!r}, expected it to contain {want!r}")


def run_mode(mode, comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    import deep_ep

    if mode == "comm":
        if dist.is_initialized():
            raise AssertionError("torch.distributed must not be initialised in mode 'comm'")

        def new_buffer(**kwargs):
            return deep_ep.Buffer(None, comm=comm, **kwargs)
    elif mode == "torch":
        if not dist.is_initialized():
            port = comm.bcast(free_port() if rank == 0 else None, root=0)
            from deep_ep._comm import loopback_store  # torch's tcp:// init method would listen on every interface
            dist.init_process_group("gloo", store=loopback_store(port, rank, size, 120), rank=rank, world_size=size,
                                    timeout=timedelta(seconds=120))

        def new_buffer(**kwargs):
            return deep_ep.Buffer(dist.group.WORLD, **kwargs)
    else:
        raise SystemExit(f"unknown mode {mode!r}: expected 'comm' or 'torch'")

    num_experts = NUM_EXPERTS_PER_RANK * size
    seed = comm.bcast(int(torch.randint(0, 1 << 30, (1,)).item()) if rank == 0 else None, root=0)
    inputs = [make_inputs(seed, s, num_experts) for s in range(size)]

    buffer = new_buffer(num_nvl_bytes=1 << 26, explicitly_destroy=True)  # >= the size hints (R=4, hidden 256)
    if buffer.group_size != size:
        raise AssertionError(f"buffer.group_size {buffer.group_size}, expected {size}")
    engine = buffer.engine
    check_normal(buffer, rank, size, inputs, num_experts)
    check_faults(buffer, rank, size, inputs, num_experts)
    check_normal(buffer, rank, size, inputs, num_experts)  # the Buffer is still usable
    buffer.destroy()

    ll_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, HIDDEN, size, num_experts)
    buffer = new_buffer(num_rdma_bytes=ll_bytes, low_latency_mode=True,
                        num_qps_per_rank=NUM_EXPERTS_PER_RANK, explicitly_destroy=True)
    check_low_latency(buffer, rank, size, inputs, num_experts)
    buffer.destroy()

    comm.Barrier()
    print(f"OK rank {rank} of {size} mode {mode} seed {seed} engine {engine}", flush=True)


def main(modes):
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    # "comm" must come first: it checks that torch.distributed was never initialised.
    for mode in modes:
        run_mode(mode, comm)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:] or ["comm", "torch"])
    except BaseException:  # noqa: BLE001 - any failure must take the whole job down, not hang it
        sys.stdout.flush()
        print(f"FAILED rank {MPI.COMM_WORLD.Get_rank()}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)
