"""Cases and per-rank workers for the GPU tests of the CUDA low-latency engine (imported by
``test_ll_cuda.py``, ``sanitize_ll_case.py`` and ``bench_ll.py``; nothing here runs without a GPU).

Every rank draws all ranks' inputs from one seed and runs each call on two engines over the same gloo
group: `CudaLowLatency` (the kernels, over the transport under test) and `PortableLowLatency` (the
oracle). They are used directly, not through `Buffer`, so the tests do not depend on how `Buffer`
chooses its LL engine. Compared: ``recv_count``, ``layout_range``, ``src_info`` (all rows), the valid
rows of ``recv_x`` and of the scales (bit for bit: FP8 bytes, float32 / UE8M0 scales), the cumulative
receive statistics, and the combine output (bit for bit; LogFMT within the one-code tolerance that
docs/semantics.md allows). Also: hook mode, zero-copy combine, ``out=``, CUDA-graph capture and replay,
and shrink-mode masking. Mismatches are collected, not raised, so all ranks keep issuing the same calls.

All ranks share one GPU as separate processes: with ``peer`` the LL buffers are mapped with CUDA IPC,
with ``nvshmem`` NVSHMEM runs several PEs per GPU over its P2P transport (IBGDA off, remote transport
none: `deep_ep._nvshmem.apply_env_defaults` with ``single_host``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from intranode_cases import Checker, _device, compiled_engine, emulated, synchronize

# NVSHMEM on one GPU without a NIC: forced in the ranks, whatever the machine image exports.
NVSHMEM_TEST_ENV = {"NVSHMEM_IB_ENABLE_IBGDA": "0", "NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_DISABLE_NVLS": "1",
                    "NVSHMEM_DISABLE_NCCL": "1", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}


@dataclass(frozen=True)
class LLCase:
    name: str
    tokens: tuple = (24, 17, 30, 9)   # per rank, cycled (<= t_max)
    t_max: int = 32
    hidden: int = 256
    num_topk: int = 4
    experts_per_rank: int = 3
    fp8: bool = False
    round_scale: bool = False
    ue8m0: bool = False
    logfmt: bool = False
    zero_copy: bool = False
    hook: bool = False
    use_out: bool = False
    duplicates: bool = False           # tokens may list one expert twice
    minus_one: float = 0.15


LL_CASES: List[LLCase] = [
    LLCase("bf16"),
    LLCase("fp8, float scales, hidden 384 (3 blocks)", hidden=384, fp8=True),
    LLCase("fp8 round_scale + UE8M0, hidden 640 (5 blocks: a padded int32)", hidden=640, fp8=True, round_scale=True,
           ue8m0=True),
    LLCase("bf16, top-16, duplicates, hook mode", tokens=(10, 7, 12, 3), t_max=192, num_topk=16, experts_per_rank=6,
           duplicates=True, hook=True),
    LLCase("zero-copy combine with out=, rank with no tokens", tokens=(0, 21, 32, 5), zero_copy=True, use_out=True),
    LLCase("LogFMT combine, fp8 round_scale", fp8=True, round_scale=True, logfmt=True, hidden=512),
    LLCase("hidden 7168, 128 tokens", tokens=(128, 100), t_max=128, hidden=7168, num_topk=8, experts_per_rank=4, fp8=True),
]


def rdma_bytes_for(cases, num_ranks: int) -> int:
    from deep_ep import Buffer
    return max(Buffer.get_low_latency_rdma_size_hint(c.t_max, c.hidden, num_ranks, c.experts_per_rank * num_ranks)
               for c in cases)


def ll_inputs(case: LLCase, num_ranks: int, rank: int, seed: int, device: torch.device):
    """This rank's (x, topk_idx, topk_weights); every rank draws every rank's inputs."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = case.experts_per_rank * num_ranks
    mine = None
    for s in range(num_ranks):
        t = case.tokens[s % len(case.tokens)]
        if case.duplicates:
            idx = torch.randint(0, num_experts, (t, case.num_topk), generator=gen)
        else:
            k = min(case.num_topk, num_experts)
            idx = torch.rand(t, num_experts, generator=gen).argsort(dim=1)[:, :k]
            if k < case.num_topk:
                idx = torch.cat([idx, torch.full((t, case.num_topk - k), -1, dtype=torch.int64)], 1)
        drop = torch.rand(t, case.num_topk, generator=gen) < case.minus_one
        idx = torch.where(drop, torch.full_like(idx, -1), idx).to(torch.int64)
        x = (torch.randn(t, case.hidden, generator=gen) * torch.pow(2.0, torch.randint(-6, 7, (t, 1), generator=gen).float()))
        x = x.to(torch.bfloat16)
        w = torch.rand(t, case.num_topk, generator=gen)
        if s == rank:
            mine = (x.to(device), idx.to(device), w.to(device))
    return mine


def make_engines(group, transport: str, rdma_bytes: int, shrink: bool = True):
    """(CudaLowLatency over `transport`, PortableLowLatency) on this rank, sharing one Communicator."""
    from deep_ep._comm import Communicator
    from deep_ep.engines.cuda_ll import CudaLowLatency
    from deep_ep.engines.local_buffers import LocalBuffers
    from deep_ep.engines.portable_ll import PortableLowLatency
    comm = Communicator(group)
    local = LocalBuffers(0, rdma_bytes)
    portable = PortableLowLatency(comm, local, rdma_bytes, shrink)
    cuda = CudaLowLatency(comm, rdma_bytes, shrink, transport, single_host=True)
    return cuda, portable, comm


def _valid_rows(t: torch.Tensor, counts: torch.Tensor) -> List[torch.Tensor]:
    return [t[j, :int(counts[j])] for j in range(t.size(0))]


def _compare_dispatch(chk: Checker, got, want, fp8: bool) -> None:
    recv_c, count_c, handle_c = got[:3]
    recv_p, count_p, handle_p = want[:3]
    chk.equal("recv_count", count_c, count_p)
    chk.equal("handle.src_info", handle_c[0], handle_p[0])
    chk.equal("handle.layout_range", handle_c[1], handle_p[1])
    chk.true("handle sizes", tuple(handle_c[2:]) == tuple(handle_p[2:]), f"{handle_c[2:]} vs {handle_p[2:]}")
    counts = count_p.cpu()
    if fp8:
        chk.equal("scales dtype/shape", torch.empty(0, dtype=recv_c[1].dtype), torch.empty(0, dtype=recv_p[1].dtype))
        chk.true("scales strides", recv_c[1].stride() == recv_p[1].stride(), f"{recv_c[1].stride()} vs {recv_p[1].stride()}")
        for j, (g, w) in enumerate(zip(_valid_rows(recv_c[0], counts), _valid_rows(recv_p[0], counts))):
            chk.equal(f"recv_x fp8 bytes, expert {j}", g, w)
        for j, (g, w) in enumerate(zip(_valid_rows(recv_c[1], counts), _valid_rows(recv_p[1], counts))):
            chk.equal(f"scales, expert {j}", g, w)
    else:
        for j, (g, w) in enumerate(zip(_valid_rows(recv_c, counts), _valid_rows(recv_p, counts))):
            chk.equal(f"recv_x, expert {j}", g, w)


def run_ll_case(engines, rank: int, num_ranks: int, case: LLCase, seed: int, chk: Checker) -> None:
    cuda, port, _ = engines
    device = _device(rank)
    num_experts = case.experts_per_rank * num_ranks
    x, topk_idx, topk_w = ll_inputs(case, num_ranks, rank, seed, device)
    stats_c = torch.zeros(case.experts_per_rank, dtype=torch.int32, device=device)
    stats_p = torch.zeros_like(stats_c)
    wait_c = torch.zeros(num_ranks, dtype=torch.int64, device=device)
    args = (case.t_max, num_experts)
    flags = (case.fp8, case.round_scale, case.ue8m0)
    out_c = cuda.dispatch(x, topk_idx, *args, stats_c, wait_c, *flags, case.hook)
    if case.hook:
        out_c[3]()
    out_p = port.dispatch(x, topk_idx, *args, stats_p, None, *flags, False)
    _compare_dispatch(chk, out_c, out_p, case.fp8)
    chk.equal("cumulative_local_expert_recv_stats", stats_c, stats_p)
    chk.true("dispatch wait stats >= 0", bool((wait_c >= 0).all()), str(wait_c.tolist()))

    # Expert outputs: any bf16 data in the dispatch layout (the same on both engines).
    gen = torch.Generator().manual_seed(seed + 1)
    y = (torch.randn(case.experts_per_rank, num_ranks * case.t_max, case.hidden, generator=gen)).to(torch.bfloat16).to(device)
    handle_c, handle_p = out_c[2], out_p[2]
    if case.zero_copy:
        cuda.get_next_combine_buffer(handle_c).copy_(y)
        port.get_next_combine_buffer(handle_p).copy_(y)
    out_t_c = torch.empty(topk_idx.size(0), case.hidden, dtype=torch.bfloat16, device=device) if case.use_out else None
    comb_c, hook = cuda.combine(y, topk_idx, topk_w, handle_c, case.logfmt, case.zero_copy, case.hook, out_t_c, None)
    if case.hook:
        hook()
    comb_p, _ = port.combine(y, topk_idx, topk_w, handle_p, case.logfmt, case.zero_copy, False, None, None)
    if case.use_out:
        chk.true("combine out= is returned", comb_c.data_ptr() == out_t_c.data_ptr())
    if case.logfmt:
        diff = (comb_c.float() - comb_p.float()).abs()
        bound = 0.05 * comb_p.float().abs() + 1e-3
        chk.true("combined_x (LogFMT, within one code)", bool((diff <= bound).all()),
                 f"max |diff| {float(diff.max()):.3g}")
    else:
        chk.equal("combined_x", comb_c, comb_p)


def run_graph_case(engines, rank: int, num_ranks: int, seed: int, chk: Checker) -> None:
    """Capture dispatch + combine on every rank, replay with new x, compare with the portable engine."""
    cuda, port, _ = engines
    case = LLCase("graph", tokens=(20, 13), fp8=True)
    device = _device(rank)
    num_experts = case.experts_per_rank * num_ranks
    x, topk_idx, topk_w = ll_inputs(case, num_ranks, rank, seed, device)
    y = torch.randn(case.experts_per_rank, num_ranks * case.t_max, case.hidden,
                    generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(device)

    def step():
        out = cuda.dispatch(x, topk_idx, case.t_max, num_experts, None, None, True, False, False, False)
        comb, _ = cuda.combine(y, topk_idx, topk_w, out[2], False, False, False, None, None)
        return out, comb

    step()  # workspace allocation and warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    # the eager portable calls must use the same slots as the replays: both engines advanced by 2 per step
    for attempt in range(2):
        x.copy_(ll_inputs(case, num_ranks, rank, seed + 100 + attempt, device)[0])
        graph.replay()
        torch.cuda.synchronize()
        want = port.dispatch(x, topk_idx, case.t_max, num_experts, None, None, True, False, False, False)
        _compare_dispatch(chk, captured[0], want, True)
        comb_p, _ = port.combine(y, topk_idx, topk_w, want[2], False, False, False, None, None)
        chk.equal(f"graph replay {attempt + 1}: combined_x", captured[1], comb_p)
    del graph


def run_shrink_case(engines, rank: int, num_ranks: int, seed: int, chk: Checker) -> None:
    """Mask the last rank on every rank (same mask everywhere): outputs equal the portable engine's."""
    cuda, port, _ = engines
    case = LLCase("shrink")
    device = _device(rank)
    masked = num_ranks - 1
    for eng in (cuda, port):
        eng.update_mask(masked, True)
    num_experts = case.experts_per_rank * num_ranks
    x, topk_idx, topk_w = ll_inputs(case, num_ranks, rank, seed, device)
    out_c = cuda.dispatch(x, topk_idx, case.t_max, num_experts, None, None, False, False, False, False)
    out_p = port.dispatch(x, topk_idx, case.t_max, num_experts, None, None, False, False, False, False)
    _compare_dispatch(chk, out_c, out_p, False)
    y = out_p[0].clone()
    comb_c, _ = cuda.combine(y, topk_idx, topk_w, out_c[2], False, False, False, None, None)
    comb_p, _ = port.combine(y, topk_idx, topk_w, out_p[2], False, False, False, None, None)
    chk.equal("combined_x (one rank masked)", comb_c, comb_p)
    status = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    cuda.query_mask(status)
    chk.true("query_mask", int(status[masked]) == 1 and int(status.sum()) == 1, str(status.tolist()))
    for eng in (cuda, port):
        eng.clean_mask()


def ll_worker(rank: int, num_ranks: int, group, seed: int, transport: str, cases: List[LLCase],
              extras: bool) -> List[str]:
    if not emulated():
        torch.cuda.set_device(_device(rank))
    chk = Checker(rank)
    chk.prefix = f"{transport} engine set-up"
    engines = make_engines(group, transport, rdma_bytes_for(cases + [LLCase("graph"), LLCase("shrink")], num_ranks))
    for i, case in enumerate(cases):
        chk.prefix = f"{transport}: case {case.name!r} (seed {seed + 10 * i})"
        run_ll_case(engines, rank, num_ranks, case, seed + 10 * i, chk)
    if extras:
        if not emulated():  # no CUDA graphs on CPU tensors
            chk.prefix = f"{transport}: CUDA graph"
            run_graph_case(engines, rank, num_ranks, seed + 7, chk)
        chk.prefix = f"{transport}: shrink mode"
        run_shrink_case(engines, rank, num_ranks, seed + 9, chk)
    synchronize()
    engines[0].destroy(collective=True)
    engines[2].close()
    return chk.failures


def buffer_worker(rank: int, num_ranks: int, group, seed: int, transport: str) -> List[str]:
    """Through `deep_ep.Buffer`: the LL
    engine choice, ``async_finish`` events and hooks, compared with a portable-engine Buffer."""
    import os

    import deep_ep
    if not emulated():
        torch.cuda.set_device(_device(rank))
    chk = Checker(rank)
    chk.prefix = f"Buffer ({transport})"
    case = LLCase("buffer", fp8=True)
    num_experts = case.experts_per_rank * num_ranks
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(case.t_max, case.hidden, num_ranks, num_experts)
    buf = deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, explicitly_destroy=True)
    if not hasattr(buf, "ll_engine"):
        buf.destroy()
        return ["SKIP: deep_ep.Buffer has no ll_engine"] if rank == 0 else []
    chk.true("ll_engine", buf.ll_engine == compiled_engine(), f"{buf.ll_engine}: {buf.ll_engine_reason}")
    chk.true("engine_reason mentions the LL engine", f"low-latency mode: {compiled_engine()}" in buf.engine_reason,
             buf.engine_reason)
    saved = os.environ.get("DEEP_EP_ENGINE")
    os.environ["DEEP_EP_ENGINE"] = "portable"
    try:
        ref = deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, explicitly_destroy=True)
    finally:
        if saved is None:
            os.environ.pop("DEEP_EP_ENGINE", None)
        else:
            os.environ["DEEP_EP_ENGINE"] = saved
    x, topk_idx, topk_w = ll_inputs(case, num_ranks, rank, seed, _device(rank))
    for mode in ("async_finish", "hook"):
        got = buf.low_latency_dispatch(x, topk_idx, case.t_max, num_experts, use_fp8=True,
                                       async_finish=mode == "async_finish", return_recv_hook=mode == "hook")
        if mode == "hook":
            got[4]()
        else:
            got[3].current_stream_wait()
        want = ref.low_latency_dispatch(x, topk_idx, case.t_max, num_experts, use_fp8=True)
        chk.prefix = f"Buffer ({transport}, {mode})"
        _compare_dispatch(chk, got[:3], want[:3], True)
        y = torch.randn(case.experts_per_rank, num_ranks * case.t_max, case.hidden,
                        generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(x.device)
        comb = buf.low_latency_combine(y, topk_idx, topk_w, got[2], async_finish=mode == "async_finish",
                                       return_recv_hook=mode == "hook")
        if mode == "hook":
            comb[2]()
        else:
            comb[1].current_stream_wait()
        comb_ref = ref.low_latency_combine(y, topk_idx, topk_w, want[2])
        chk.equal("combined_x", comb[0], comb_ref[0])
    rdma_view = buf.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
    chk.true("get_local_buffer_tensor(use_rdma_buffer=True) is the CUDA LL buffer",
             rdma_view.device.type == ("cpu" if emulated() else "cuda"))
    synchronize()
    buf.destroy()
    ref.destroy()
    return chk.failures
