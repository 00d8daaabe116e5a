"""Cases and per-rank workers for the internode (two-hop) CUDA engine's GPU tests: "virtual nodes" on
one GPU (``DEEP_EP_RANKS_PER_NODE`` = P below the number of processes, every rank a process on the
same device, RDMA hop over the peer-memory transport). Imported by ``test_internode_cuda.py``, the
sanitizer script, the benchmark and the device check; nothing here runs without a GPU.

Like ``intranode_cases.py``: every rank builds all ranks' inputs from one seed, runs each operation on
a CUDA-engine Buffer and on a portable Buffer over the same gloo group, and compares every output and
all 10 handle fields bit for bit. The combine's top-k weights are the dispatch's ``recv_topk_weights``
(non-zero on at most one rank per slot), for which both engines' sums are exact (docs/semantics.md).
"""

from __future__ import annotations

import os
from typing import List

import torch

import intranode_cases
from intranode_cases import HANDLE_FIELDS_MULTI_NODE as HANDLE_FIELDS  # noqa: F401 (re-exported)
from intranode_cases import (Case, Checker, _bf16, _combine_inputs, _device, build_inputs, compiled_engine, emulated,
                             synchronize)

NVL_BYTES = 48 << 20
RDMA_BYTES = 48 << 20

# config = (num_sms, nvl send chunk, nvl ring slots); rdma = (rdma send chunk, rdma ring slots)
CASES: List[Case] = [
    Case("bf16, 2 channels, RDMA ring 16 / chunk 4 and NVL ring 32 (both wrap), worst tokens"),
    Case("fp8 pair with column-major scales, alignment 4, bias pair", tokens=(40, 72), hidden=384, fp8=True,
         alignment=4, bias="pair", wide=True),
    Case("no top-k, hidden 136 (odd int4 count), bias one, 3 channels", tokens=(50, 31, 64), hidden=136,
         with_topk=False, config=(6, 4, 16), bias="one", worst_extra=None),
    Case("rank 0 has no tokens, last rank receives nothing", tokens=(0, 37, 64, 20), routing="skip_last",
         num_topk=2, worst_extra=1),
    Case("all -1", tokens=(16, 9), routing="all_minus_one", bias="pair", worst_extra=2),
    Case("one expert per rank, NVL ring of 8 (forwarder window 8), top-3", tokens=(96, 57), num_topk=3,
         experts_per_rank=1, config=(4, 6, 8), wide=True, bias="pair"),
    Case("hidden 7168 bf16, 4 channels, rings of 64", tokens=(64, 40), hidden=7168, config=(8, 6, 64),
         worst_extra=None),
]

# The compute-sanitizer case (sanitize_internode_case.py): one channel, rings of 4 that wrap.
SANITIZER_CASE = Case("sanitizer: 1 channel, rings of 4", tokens=(8, 5, 0, 7), hidden=64, num_topk=2,
                      experts_per_rank=2, config=(2, 2, 4), bias="pair", worst_extra=2)

# (rdma send chunk, rdma ring slots) per case; (6, 64) otherwise. Looked up in the workers (spawned
# processes), so entries must be made here, at import.
RDMA_CONFIG = {CASES[0].name: (4, 16), SANITIZER_CASE.name: (2, 4)}


def _config(case: Case):
    import deep_ep
    rdma_send, rdma_recv = RDMA_CONFIG.get(case.name, (6, 64))
    return deep_ep.Config(case.config[0], case.config[1], case.config[2], rdma_send, rdma_recv)


def num_rows(handle: tuple) -> int:
    return handle[7].size(0) if len(handle) == 10 else handle[3].size(0)


def _check_dispatch(chk: Checker, out_c, out_p) -> None:
    for i, name in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list")):
        chk.equal(name, out_c[i], out_p[i])
    chk.true("handle is a 10-tuple", isinstance(out_c[4], tuple) and len(out_c[4]) == 10,
             f"got {type(out_c[4]).__name__} of {len(out_c[4]) if isinstance(out_c[4], tuple) else '?'}")
    for name, g, w in zip(HANDLE_FIELDS, out_c[4], out_p[4]):
        chk.equal(f"handle.{name}", g, w)


def run_case(bufs, rank: int, num_ranks: int, case: Case, seed: int, chk: Checker) -> None:
    cuda_buf, port_buf = bufs
    device = _device(rank)
    num_experts = case.experts_per_rank * num_ranks
    topk_idx, topk_weights, x = build_inputs(case, num_ranks, rank, seed, device)
    config = _config(case)

    # ---- layout (num_tokens_per_rdma_rank included)
    lay_c = cuda_buf.get_dispatch_layout(topk_idx, num_experts)
    lay_p = port_buf.get_dispatch_layout(topk_idx, num_experts)
    for i, name in enumerate(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                              "is_token_in_rank")):
        chk.equal(f"layout.{name}", lay_c[i], lay_p[i])
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = lay_p[:4]

    # ---- dispatch
    kwargs = dict(num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                  is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                  expert_alignment=case.alignment, config=config)
    if case.with_topk:
        kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
    out_c = cuda_buf.dispatch(x, **kwargs)
    out_p = port_buf.dispatch(x, **kwargs)
    _check_dispatch(chk, out_c, out_p)
    handle_c, handle_p = out_c[4], out_p[4]

    # ---- cached dispatch (each engine with its own handle)
    cached_c = cuda_buf.dispatch(x, handle=handle_c, config=config)
    cached_p = port_buf.dispatch(x, handle=handle_p, config=config)
    chk.equal("cached recv_x", cached_c[0], cached_p[0])

    # ---- combine (twice: the handle is reusable)
    rows = num_rows(handle_p)
    y, w, bias = _combine_inputs(case, rows, topk_idx.size(0), seed + 1, device, out_p[2])
    comb_p = port_buf.combine(y, handle_p, topk_weights=w, bias=bias, config=config)
    for attempt in range(2):
        comb_c = cuda_buf.combine(y, handle_c, topk_weights=w, bias=bias, config=config)
        chk.equal(f"combined_x (call {attempt + 1})", comb_c[0], comb_p[0])
        chk.equal(f"combined_topk_weights (call {attempt + 1})", comb_c[1], comb_p[1])

    # ---- num_worst_tokens: padded outputs (send_nvl_head has P * W rows), then cached and combine
    if case.worst_extra is None or not case.with_topk:
        return
    # An upper bound of every rank's receive count that every rank computes alike.
    worst = sum(case.tokens[s % len(case.tokens)] for s in range(num_ranks)) + case.worst_extra
    chk.prefix += f" (num_worst_tokens={worst})"
    out_c = cuda_buf.dispatch(x, **kwargs, num_worst_tokens=worst)
    out_p = port_buf.dispatch(x, **kwargs, num_worst_tokens=worst)
    _check_dispatch(chk, out_c, out_p)
    cached_c = cuda_buf.dispatch(x, handle=out_c[4], config=config)
    cached_p = port_buf.dispatch(x, handle=out_p[4], config=config)
    chk.equal("cached recv_x", cached_c[0], cached_p[0])
    gen = torch.Generator().manual_seed(seed + 2)
    y_pad = torch.cat([y, _bf16((worst - rows, case.hidden), gen, True).to(device)])
    comb_c = cuda_buf.combine(y_pad, out_c[4], topk_weights=out_p[2], bias=bias, config=config)
    comb_p = port_buf.combine(y_pad, out_p[4], topk_weights=out_p[2], bias=bias, config=config)
    chk.equal("combined_x", comb_c[0], comb_p[0])
    chk.equal("combined_topk_weights", comb_c[1], comb_p[1])


def make_buffers(group, nvl_bytes: int = NVL_BYTES, rdma_bytes: int = RDMA_BYTES):
    """(CUDA-engine Buffer, portable Buffer) with both regions."""
    return intranode_cases.make_buffers(group, nvl_bytes, num_rdma_bytes=rdma_bytes)


def internode_worker(rank: int, num_ranks: int, group, seed: int, cases: List[Case], extras: bool) -> List[str]:
    if not emulated():
        torch.cuda.set_device(_device(rank))
    bufs = make_buffers(group)
    chk = Checker(rank)
    chk.prefix = "buffer"
    chk.true("engine", bufs[0].engine == compiled_engine(), f"got {bufs[0].engine!r}: {bufs[0].engine_reason}")
    chk.true("num_nodes", bufs[0].num_nodes >= 2, f"got {bufs[0].num_nodes} (set DEEP_EP_RANKS_PER_NODE)")
    want = os.environ.get("DEEP_EP_INTERNODE_TRANSPORT", "auto").split("-")[0]
    got = getattr(bufs[0]._cuda, "transport", None)
    chk.true("transport", want == "auto" or got == want, f"asked for {want}, got {got}: {bufs[0].engine_reason}")
    if chk.failures:
        return chk.failures
    for i, case in enumerate(cases):
        chk.prefix = f"case {case.name!r} (seed {seed + 10 * i})"
        run_case(bufs, rank, num_ranks, case, seed + 10 * i, chk)
    if extras:
        chk.prefix = "CUDA graph"
        intranode_cases.run_graph_case(bufs, rank, num_ranks, seed + 9, chk, config=_config(Case("graph")))
    synchronize()
    for b in bufs:
        b.destroy()
    return chk.failures
