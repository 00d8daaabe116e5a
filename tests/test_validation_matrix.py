"""Validation matrix: every public `deep_ep.Buffer` method x every kind of bad argument.

Kinds: wrong type, wrong dtype, wrong shape, non-contiguous, out-of-range value, inconsistent
combination (of arguments, of modes, or across ranks). For every case, every rank makes the same bad
call and must raise a clear error: ``TypeError``/``ValueError``/``RuntimeError`` whose message starts
with the method (``deep_ep.Buffer.dispatch: ...``) and names the offending argument in backticks.
Right after it, the same ranks make the method's good call, whose result must equal the one from
before any bad call: a rejected call leaves the buffer usable.

Everything runs in one spawn of two ranks; each case is then reported as its own test. This
complements ``tests/test_validation.py`` (normal-mode rules checked against the reference) by
covering the whole public surface systematically, low-latency and shrink methods included.
"""

from __future__ import annotations

import hashlib
import re
import traceback
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import pytest
import torch

from dist_utils import run_ranks

R = 2
T = 6
H = 128
K = 2
E = 4
LL_T = 8
ERRORS = (TypeError, ValueError, RuntimeError)
NVL = 1 << 24  # >= Config.get_nvl_buffer_size_hint(H * 2, R) of the dispatch and combine configs (checked below)


class Case(NamedTuple):
    method: str                 # public method (its good call is re-run after the bad one)
    kind: str                   # wrong type | wrong dtype | wrong shape | non-contiguous | out of range | inconsistent
    label: str                  # what is wrong
    call: Callable[[Any], Any]  # ctx -> the bad call
    names: Tuple[str, ...]      # argument names the message may name (any one)
    where: str = ""             # message prefix, default "deep_ep.Buffer.<method>"


def _hash(*values: Any) -> str:
    h = hashlib.sha256()

    def add(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, (tuple, list)):
            h.update(f"[{len(v)}".encode())
            for x in v:
                add(x)
        elif hasattr(v, "__dict__") and not callable(v):
            add(sorted(vars(v).items()))
        else:
            h.update(repr(v).encode())

    for v in values:
        add(v)
    return h.hexdigest()


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, not contiguous."""
    if t.dim() >= 2:
        return t.t().contiguous().t() if t.size(0) > 1 and t.size(1) > 1 else t.repeat(1, 2)[:, ::2]
    return t.repeat(2)[::2]


# --------------------------------------------------------------------------------------------------
# Per-rank context: good inputs, buffers, good calls

class Ctx:
    def __init__(self, rank: int, group) -> None:
        import deep_ep
        self.deep_ep = deep_ep
        self.rank = rank
        self.group = group
        g = torch.Generator().manual_seed(1234 + rank)
        self.x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        self.topk_idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].contiguous()
        self.topk_weights = torch.rand(T, K, generator=g)
        self.ll_x = torch.randn(LL_T - 2, H, generator=g).to(torch.bfloat16)
        self.ll_idx = torch.rand(LL_T - 2, E, generator=g).argsort(dim=1)[:, :K].contiguous()
        self.ll_w = torch.rand(LL_T - 2, K, generator=g)
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_T, H, R, E)
        self.rdma_bytes = rdma
        assert all(cfg.get_nvl_buffer_size_hint(H * 2, R) <= NVL
                   for cfg in (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)))
        self.buf = deep_ep.Buffer(group, num_nvl_bytes=NVL, num_rdma_bytes=rdma, low_latency_mode=True)
        self.normal_only = deep_ep.Buffer(group, num_nvl_bytes=NVL)
        self.sbuf = deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True,
                                   enable_shrink=True)
        # Good results every later check compares against.
        self.layout = self.buf.get_dispatch_layout(self.topk_idx, E)[:4]
        out = self.dispatch_kwargs()
        self.recv_x, self.recv_idx, self.recv_w, self.counts, self.handle, _ = self.buf.dispatch(self.x, **out)
        recv, self.ll_count, self.ll_handle, _, _ = self.buf.low_latency_dispatch(self.ll_x, self.ll_idx, LL_T, E,
                                                                                 use_fp8=False)
        self.ll_recv = recv
        self.mask = torch.zeros(R, dtype=torch.int32)

    def dispatch_kwargs(self, **over) -> Dict[str, Any]:
        per_rank, _, per_expert, in_rank = self.layout
        kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=self.topk_idx, topk_weights=self.topk_weights)
        kw.update(over)
        return kw

    def ll_combine_kwargs(self, **over) -> Dict[str, Any]:
        kw = dict(x=self.ll_recv, topk_idx=self.ll_idx, topk_weights=self.ll_w, handle=self.ll_handle)
        kw.update(over)
        return kw

    def ll_dispatch_kwargs(self, **over) -> Dict[str, Any]:
        kw = dict(x=self.ll_x, topk_idx=self.ll_idx, num_max_dispatch_tokens_per_rank=LL_T, num_experts=E,
                  use_fp8=False)
        kw.update(over)
        return kw


def _ll_valid(recv: torch.Tensor, count: torch.Tensor) -> List[torch.Tensor]:
    return [recv[e, :int(c)] for e, c in enumerate(count.tolist())]


def good_call(ctx: Ctx, method: str) -> str:
    """The method's good call; returns a digest of its deterministic outputs."""
    b, D = ctx.buf, ctx.deep_ep.Buffer
    if method in ("dispatch", "internode_dispatch"):
        out = b.dispatch(ctx.x, **ctx.dispatch_kwargs())
        return _hash(out[:5])
    if method == "cached dispatch":
        return _hash(b.dispatch(ctx.x, handle=ctx.handle)[0])
    if method in ("combine", "internode_combine"):
        return _hash(b.combine(ctx.recv_x, ctx.handle, topk_weights=ctx.recv_w)[:2])
    if method == "get_dispatch_layout":
        return _hash(b.get_dispatch_layout(ctx.topk_idx, E)[:4])
    if method == "low_latency_dispatch":
        recv, count, handle, _, _ = b.low_latency_dispatch(**ctx.ll_dispatch_kwargs())
        return _hash(_ll_valid(recv, count), count, handle)
    if method == "low_latency_combine":
        return _hash(b.low_latency_combine(**ctx.ll_combine_kwargs())[0])
    if method == "clean_low_latency_buffer":
        b.clean_low_latency_buffer(LL_T, H, E)
        return "ok"
    if method == "get_next_low_latency_combine_buffer":
        return _hash(tuple(b.get_next_low_latency_combine_buffer(ctx.ll_handle).shape))
    if method == "get_local_buffer_tensor":
        return _hash(tuple(b.get_local_buffer_tensor(torch.float32, torch.Size([4]), 0, False).shape))
    if method in ("low_latency_update_mask_buffer", "low_latency_query_mask_buffer",
                  "low_latency_clean_mask_buffer"):
        ctx.sbuf.low_latency_update_mask_buffer(R - 1, False)
        mask = torch.ones(R, dtype=torch.int32)
        ctx.sbuf.low_latency_query_mask_buffer(mask)
        ctx.sbuf.low_latency_clean_mask_buffer()
        return _hash(mask)
    if method == "set_num_sms":
        D.set_num_sms(20)
        return _hash(D.num_sms)
    if method in ("get_dispatch_config", "get_combine_config"):
        return _hash(getattr(D, method)(R))
    if method == "get_low_latency_rdma_size_hint":
        return _hash(D.get_low_latency_rdma_size_hint(LL_T, H, R, E))
    if method in ("__init__", "destroy"):
        return _hash(b.dispatch(ctx.x, **ctx.dispatch_kwargs())[:5])
    raise KeyError(method)


# --------------------------------------------------------------------------------------------------
# The matrix

def _cases() -> List[Case]:
    cases: List[Case] = []

    def add(method, kind, label, call, *names, where=""):
        cases.append(Case(method, kind, label, call, tuple(names), where))

    # ---- get_dispatch_layout
    m = "get_dispatch_layout"
    add(m, "wrong type", "topk_idx is a list", lambda c: c.buf.get_dispatch_layout(c.topk_idx.tolist(), E), "topk_idx")
    add(m, "wrong type", "num_experts is a float", lambda c: c.buf.get_dispatch_layout(c.topk_idx, float(E)),
        "num_experts")
    add(m, "wrong dtype", "topk_idx int32", lambda c: c.buf.get_dispatch_layout(c.topk_idx.int(), E), "topk_idx")
    add(m, "wrong shape", "topk_idx 1-D", lambda c: c.buf.get_dispatch_layout(c.topk_idx.view(-1), E), "topk_idx")
    add(m, "wrong shape", "topk_idx with 33 columns",
        lambda c: c.buf.get_dispatch_layout(torch.zeros(T, 33, dtype=torch.int64), 64), "topk_idx")
    add(m, "non-contiguous", "topk_idx strided", lambda c: c.buf.get_dispatch_layout(_noncontig(c.topk_idx), E),
        "topk_idx")
    add(m, "out of range", "expert id == num_experts",
        lambda c: c.buf.get_dispatch_layout(torch.full((T, K), E, dtype=torch.int64), E), "topk_idx")
    add(m, "out of range", "expert id -2", lambda c: c.buf.get_dispatch_layout(torch.full((T, K), -2), E), "topk_idx")
    add(m, "out of range", "num_experts not a multiple of ranks", lambda c: c.buf.get_dispatch_layout(c.topk_idx, 3),
        "num_experts")
    add(m, "wrong type", "async_finish is an int",
        lambda c: c.buf.get_dispatch_layout(c.topk_idx, E, async_finish=1), "async_finish")
    add(m, "inconsistent", "allocate_on_comm_stream without previous_event",
        lambda c: c.buf.get_dispatch_layout(c.topk_idx, E, async_finish=True, allocate_on_comm_stream=True),
        "allocate_on_comm_stream")

    # ---- dispatch
    m = "dispatch"
    d = lambda c, x=None, **kw: c.buf.dispatch(c.x if x is None else x, **c.dispatch_kwargs(**kw))  # noqa: E731
    add(m, "wrong type", "x is a list", lambda c: d(c, x=c.x.tolist()), "x")
    add(m, "wrong type", "x is a 3-tuple", lambda c: d(c, x=(c.x, c.x, c.x)), "x")
    add(m, "wrong dtype", "x float32", lambda c: d(c, x=c.x.float()), "x")
    add(m, "wrong shape", "x 3-D", lambda c: d(c, x=c.x.unsqueeze(0)), "x")
    add(m, "wrong shape", "hidden*2 not a multiple of 16", lambda c: d(c, x=c.x[:, :H - 1].contiguous()), "x")
    add(m, "non-contiguous", "x strided", lambda c: d(c, x=_noncontig(c.x)), "x")
    add(m, "wrong dtype", "FP8 scales bfloat16",
        lambda c: d(c, x=(c.x.to(torch.float8_e4m3fn), torch.ones(T, H // 128, dtype=torch.bfloat16))), "x")
    add(m, "wrong shape", "FP8 scales with 3 columns",
        lambda c: d(c, x=(c.x.to(torch.float8_e4m3fn), torch.ones(T, 3))), "x")
    add(m, "wrong dtype", "num_tokens_per_rank int64",
        lambda c: d(c, num_tokens_per_rank=c.layout[0].long()), "num_tokens_per_rank")
    add(m, "wrong shape", "num_tokens_per_rank one entry short",
        lambda c: d(c, num_tokens_per_rank=c.layout[0][:-1]), "num_tokens_per_rank")
    add(m, "wrong type", "is_token_in_rank is a list",
        lambda c: d(c, is_token_in_rank=c.layout[3].tolist()), "is_token_in_rank")
    add(m, "wrong dtype", "is_token_in_rank uint8",
        lambda c: d(c, is_token_in_rank=c.layout[3].to(torch.uint8)), "is_token_in_rank")
    add(m, "wrong shape", "is_token_in_rank transposed",
        lambda c: d(c, is_token_in_rank=c.layout[3].t().contiguous()), "is_token_in_rank")
    add(m, "non-contiguous", "is_token_in_rank strided",
        lambda c: d(c, is_token_in_rank=_noncontig(c.layout[3])), "is_token_in_rank")
    add(m, "wrong dtype", "num_tokens_per_expert float",
        lambda c: d(c, num_tokens_per_expert=c.layout[2].float()), "num_tokens_per_expert")
    add(m, "wrong shape", "num_tokens_per_expert not a multiple of ranks",
        lambda c: d(c, num_tokens_per_expert=c.layout[2][:-1].contiguous()), "num_tokens_per_expert")
    add(m, "inconsistent", "no layout and no handle",
        lambda c: c.buf.dispatch(c.x, topk_idx=c.topk_idx, topk_weights=c.topk_weights),
        "num_tokens_per_rank", "is_token_in_rank", "num_tokens_per_expert")
    add(m, "wrong dtype", "topk_idx int32", lambda c: d(c, topk_idx=c.topk_idx.int()), "topk_idx")
    add(m, "wrong shape", "topk_idx one row short", lambda c: d(c, topk_idx=c.topk_idx[:-1].contiguous()), "topk_idx")
    add(m, "out of range", "topk_idx expert id too large",
        lambda c: d(c, topk_idx=torch.full((T, K), E, dtype=torch.int64)), "topk_idx")
    add(m, "wrong dtype", "topk_weights bfloat16",
        lambda c: d(c, topk_weights=c.topk_weights.bfloat16()), "topk_weights")
    add(m, "wrong shape", "topk_weights one column short",
        lambda c: d(c, topk_weights=c.topk_weights[:, :1].contiguous()), "topk_weights")
    add(m, "non-contiguous", "topk_weights strided", lambda c: d(c, topk_weights=_noncontig(c.topk_weights)),
        "topk_weights")
    add(m, "inconsistent", "topk_idx without topk_weights", lambda c: d(c, topk_weights=None),
        "topk_weights", "topk_idx")
    add(m, "wrong type", "expert_alignment is a float", lambda c: d(c, expert_alignment=1.0), "expert_alignment")
    add(m, "out of range", "expert_alignment 0", lambda c: d(c, expert_alignment=0), "expert_alignment")
    add(m, "out of range", "num_worst_tokens -1", lambda c: d(c, num_worst_tokens=-1), "num_worst_tokens")
    add(m, "out of range", "num_worst_tokens below what a rank receives (found after the count exchange)",
        lambda c: d(c, num_worst_tokens=1), "num_worst_tokens")
    add(m, "inconsistent", "num_worst_tokens without top-k",
        lambda c: d(c, num_worst_tokens=64, topk_idx=None, topk_weights=None), "num_worst_tokens")
    add(m, "wrong type", "config is a dict", lambda c: d(c, config={"num_sms": 20}), "config")
    add(m, "wrong type", "previous_event is a tensor", lambda c: d(c, previous_event=c.x), "previous_event")
    add(m, "wrong type", "async_finish is a string", lambda c: d(c, async_finish="yes"), "async_finish")
    add(m, "inconsistent", "allocate_on_comm_stream without previous_event",
        lambda c: d(c, async_finish=True, allocate_on_comm_stream=True), "allocate_on_comm_stream")

    # ---- cached dispatch
    m = "cached dispatch"
    w = "deep_ep.Buffer.dispatch"
    add(m, "wrong type", "handle is a list", lambda c: c.buf.dispatch(c.x, handle=list(c.handle)), "handle", where=w)
    add(m, "wrong shape", "handle with a field missing", lambda c: c.buf.dispatch(c.x, handle=c.handle[:5]),
        "handle", where=w)
    add(m, "wrong dtype", "handle field int64",
        lambda c: c.buf.dispatch(c.x, handle=(c.handle[0].long(),) + c.handle[1:]), "handle", where=w)
    add(m, "inconsistent", "x with more tokens than the handle",
        lambda c: c.buf.dispatch(torch.cat([c.x, c.x]), handle=c.handle), "handle", "x", where=w)
    add(m, "inconsistent", "handle together with topk_idx",
        lambda c: c.buf.dispatch(c.x, handle=c.handle, topk_idx=c.topk_idx, topk_weights=c.topk_weights),
        "handle", where=w)

    # ---- combine
    m = "combine"
    cb = lambda c, x=None, **kw: c.buf.combine(c.recv_x if x is None else x,  # noqa: E731
                                               kw.pop("handle", c.handle), **kw)
    add(m, "wrong type", "x is a tuple", lambda c: cb(c, x=(c.recv_x,)), "x")
    add(m, "wrong dtype", "x float32", lambda c: cb(c, x=c.recv_x.float()), "x")
    add(m, "wrong shape", "x one row short", lambda c: cb(c, x=c.recv_x[:-1].contiguous()), "x")
    add(m, "wrong shape", "x 1-D", lambda c: cb(c, x=c.recv_x.view(-1)), "x")
    add(m, "non-contiguous", "x strided", lambda c: cb(c, x=_noncontig(c.recv_x)), "x")
    add(m, "wrong type", "handle is None", lambda c: cb(c, handle=None), "handle")
    add(m, "wrong shape", "handle of another group size",
        lambda c: cb(c, handle=(torch.zeros(3, 3, dtype=torch.int32),) + c.handle[1:]), "handle")
    add(m, "wrong dtype", "topk_weights float64", lambda c: cb(c, topk_weights=c.recv_w.double()), "topk_weights")
    add(m, "wrong shape", "topk_weights one row short", lambda c: cb(c, topk_weights=c.recv_w[:-1]), "topk_weights")
    add(m, "wrong type", "bias is a list", lambda c: cb(c, bias=[torch.zeros(T, H)] * 3), "bias")
    add(m, "wrong dtype", "bias float32", lambda c: cb(c, bias=torch.zeros(T, H)), "bias")
    add(m, "wrong shape", "bias one row short", lambda c: cb(c, bias=torch.zeros(T - 1, H, dtype=torch.bfloat16)),
        "bias")
    add(m, "non-contiguous", "bias strided",
        lambda c: cb(c, bias=_noncontig(torch.zeros(T, H, dtype=torch.bfloat16))), "bias")
    add(m, "wrong type", "config is a string", lambda c: cb(c, config="fast"), "config")
    add(m, "wrong type", "async_finish is None", lambda c: cb(c, async_finish=None), "async_finish")

    # ---- internode aliases route through the same checks
    add("internode_dispatch", "wrong dtype", "x float32",
        lambda c: c.buf.internode_dispatch(c.x.float(), **c.dispatch_kwargs()), "x", where="deep_ep.Buffer.dispatch")
    add("internode_combine", "wrong shape", "x one row short",
        lambda c: c.buf.internode_combine(c.recv_x[:-1].contiguous(), c.handle), "x",
        where="deep_ep.Buffer.combine")

    # ---- low_latency_dispatch
    m = "low_latency_dispatch"
    ld = lambda c, **kw: c.buf.low_latency_dispatch(**c.ll_dispatch_kwargs(**kw))  # noqa: E731
    add(m, "wrong type", "x is a list", lambda c: ld(c, x=c.ll_x.tolist()), "x")
    add(m, "wrong dtype", "x float16", lambda c: ld(c, x=c.ll_x.half()), "x")
    add(m, "wrong shape", "hidden not a multiple of 128", lambda c: ld(c, x=c.ll_x[:, :64].contiguous()), "x")
    add(m, "wrong shape", "more tokens than num_max_dispatch_tokens_per_rank",
        lambda c: ld(c, x=torch.zeros(LL_T + 1, H, dtype=torch.bfloat16),
                     topk_idx=torch.zeros(LL_T + 1, K, dtype=torch.int64)), "x")
    add(m, "non-contiguous", "x strided", lambda c: ld(c, x=_noncontig(c.ll_x)), "x")
    add(m, "wrong dtype", "topk_idx int32", lambda c: ld(c, topk_idx=c.ll_idx.int()), "topk_idx")
    add(m, "wrong shape", "topk_idx with 17 columns",
        lambda c: ld(c, topk_idx=torch.zeros(LL_T - 2, 17, dtype=torch.int64)), "topk_idx")
    add(m, "out of range", "topk_idx expert id too large",
        lambda c: ld(c, topk_idx=torch.full_like(c.ll_idx, E)), "topk_idx")
    add(m, "wrong type", "num_max_dispatch_tokens_per_rank is a float",
        lambda c: ld(c, num_max_dispatch_tokens_per_rank=float(LL_T)), "num_max_dispatch_tokens_per_rank")
    add(m, "out of range", "num_max_dispatch_tokens_per_rank 0",
        lambda c: ld(c, num_max_dispatch_tokens_per_rank=0), "num_max_dispatch_tokens_per_rank", "x")
    add(m, "out of range", "layout larger than num_rdma_bytes",
        lambda c: ld(c, num_max_dispatch_tokens_per_rank=LL_T * 64), "num_rdma_bytes")
    add(m, "out of range", "num_experts not a multiple of ranks", lambda c: ld(c, num_experts=E + 1), "num_experts")
    add(m, "wrong dtype", "cumulative_local_expert_recv_stats int64",
        lambda c: ld(c, cumulative_local_expert_recv_stats=torch.zeros(E // R, dtype=torch.int64)),
        "cumulative_local_expert_recv_stats")
    add(m, "wrong shape", "dispatch_wait_recv_cost_stats one entry short",
        lambda c: ld(c, dispatch_wait_recv_cost_stats=torch.zeros(R - 1, dtype=torch.int64)),
        "dispatch_wait_recv_cost_stats")
    add(m, "wrong type", "use_fp8 is an int", lambda c: ld(c, use_fp8=1), "use_fp8")
    add(m, "inconsistent", "use_ue8m0 without round_scale", lambda c: ld(c, use_fp8=True, use_ue8m0=True),
        "use_ue8m0")
    add(m, "inconsistent", "async_finish with return_recv_hook",
        lambda c: ld(c, async_finish=True, return_recv_hook=True), "return_recv_hook", "async_finish")
    add(m, "inconsistent", "use_fp8 differs across ranks (found in the header exchange)",
        lambda c: ld(c, use_fp8=c.rank == 0), "use_fp8")
    add(m, "inconsistent", "on a buffer without low_latency_mode",
        lambda c: c.normal_only.low_latency_dispatch(c.ll_x, c.ll_idx, LL_T, E), "low_latency_mode")

    # ---- low_latency_combine
    m = "low_latency_combine"
    lc = lambda c, **kw: c.buf.low_latency_combine(**c.ll_combine_kwargs(**kw))  # noqa: E731
    add(m, "wrong type", "x is a list", lambda c: lc(c, x=[c.ll_recv]), "x")
    add(m, "wrong dtype", "x float32", lambda c: lc(c, x=c.ll_recv.float()), "x")
    add(m, "wrong shape", "x missing the expert dimension", lambda c: lc(c, x=c.ll_recv[0]), "x")
    add(m, "non-contiguous", "x strided", lambda c: lc(c, x=c.ll_recv.transpose(0, 1).contiguous().transpose(0, 1)),
        "x")
    add(m, "wrong dtype", "topk_idx float", lambda c: lc(c, topk_idx=c.ll_idx.float()), "topk_idx")
    add(m, "out of range", "topk_idx expert id too large", lambda c: lc(c, topk_idx=torch.full_like(c.ll_idx, E)),
        "topk_idx")
    add(m, "wrong shape", "topk_weights one column short", lambda c: lc(c, topk_weights=c.ll_w[:, :1].contiguous()),
        "topk_weights")
    add(m, "non-contiguous", "topk_weights strided", lambda c: lc(c, topk_weights=_noncontig(c.ll_w)),
        "topk_weights")
    add(m, "wrong type", "handle is a list", lambda c: lc(c, handle=list(c.ll_handle)), "handle")
    add(m, "wrong shape", "handle of another layout",
        lambda c: lc(c, handle=(c.ll_handle[0][:, :3],) + c.ll_handle[1:]), "handle")
    add(m, "wrong type", "out is an ndarray", lambda c: lc(c, out=c.ll_x.float().numpy()), "out")
    add(m, "wrong shape", "out one row short",
        lambda c: lc(c, out=torch.empty(LL_T - 3, H, dtype=torch.bfloat16)), "out")
    add(m, "wrong dtype", "combine_wait_recv_cost_stats int32",
        lambda c: lc(c, combine_wait_recv_cost_stats=torch.zeros(R, dtype=torch.int32)),
        "combine_wait_recv_cost_stats")
    add(m, "inconsistent", "use_logfmt with zero_copy", lambda c: lc(c, use_logfmt=True, zero_copy=True),
        "use_logfmt", "zero_copy")
    add(m, "wrong type", "zero_copy is a string", lambda c: lc(c, zero_copy="no"), "zero_copy")

    # ---- the other low-latency methods
    m = "clean_low_latency_buffer"
    add(m, "wrong type", "hidden is a float", lambda c: c.buf.clean_low_latency_buffer(LL_T, float(H), E), "hidden")
    add(m, "out of range", "hidden not a multiple of 128", lambda c: c.buf.clean_low_latency_buffer(LL_T, 100, E),
        "hidden")
    add(m, "out of range", "num_experts not a multiple of ranks",
        lambda c: c.buf.clean_low_latency_buffer(LL_T, H, E + 1), "num_experts")
    add(m, "inconsistent", "on a buffer without low_latency_mode",
        lambda c: c.normal_only.clean_low_latency_buffer(LL_T, H, E), "low_latency_mode")
    m = "get_next_low_latency_combine_buffer"
    add(m, "wrong type", "handle is None", lambda c: c.buf.get_next_low_latency_combine_buffer(None), "handle")
    add(m, "wrong dtype", "handle src_info int64",
        lambda c: c.buf.get_next_low_latency_combine_buffer((c.ll_handle[0].long(),) + c.ll_handle[1:]), "handle")

    # ---- shrink-mode mask methods
    m = "low_latency_update_mask_buffer"
    add(m, "wrong type", "rank_to_mask is a float", lambda c: c.sbuf.low_latency_update_mask_buffer(1.0, True),
        "rank_to_mask")
    add(m, "out of range", "rank_to_mask == num_ranks", lambda c: c.sbuf.low_latency_update_mask_buffer(R, True),
        "rank_to_mask")
    add(m, "out of range", "rank_to_mask -1", lambda c: c.sbuf.low_latency_update_mask_buffer(-1, True),
        "rank_to_mask")
    add(m, "wrong type", "mask is an int", lambda c: c.sbuf.low_latency_update_mask_buffer(1, 1), "mask")
    add(m, "inconsistent", "on a buffer without enable_shrink",
        lambda c: c.buf.low_latency_update_mask_buffer(1, True), "enable_shrink")
    m = "low_latency_query_mask_buffer"
    add(m, "wrong type", "mask_status is a list", lambda c: c.sbuf.low_latency_query_mask_buffer([0] * R),
        "mask_status")
    add(m, "wrong dtype", "mask_status int64",
        lambda c: c.sbuf.low_latency_query_mask_buffer(torch.zeros(R, dtype=torch.int64)), "mask_status")
    add(m, "wrong shape", "mask_status one entry short",
        lambda c: c.sbuf.low_latency_query_mask_buffer(torch.zeros(R - 1, dtype=torch.int32)), "mask_status")
    add(m, "non-contiguous", "mask_status strided",
        lambda c: c.sbuf.low_latency_query_mask_buffer(torch.zeros(2 * R, dtype=torch.int32)[::2]), "mask_status")
    add("low_latency_clean_mask_buffer", "inconsistent", "on a buffer without enable_shrink",
        lambda c: c.buf.low_latency_clean_mask_buffer(), "enable_shrink")

    # ---- local buffer access
    m = "get_local_buffer_tensor"
    add(m, "wrong type", "dtype is a string", lambda c: c.buf.get_local_buffer_tensor("float32"), "dtype")
    add(m, "wrong type", "offset is a float", lambda c: c.buf.get_local_buffer_tensor(torch.float32, None, 4.0),
        "offset")
    add(m, "out of range", "offset past the end",
        lambda c: c.buf.get_local_buffer_tensor(torch.uint8, None, NVL + 128), "offset")
    add(m, "out of range", "offset not aligned to the dtype",
        lambda c: c.buf.get_local_buffer_tensor(torch.float32, None, 2), "offset")
    add(m, "out of range", "size larger than the buffer",
        lambda c: c.buf.get_local_buffer_tensor(torch.float32, torch.Size([NVL])), "size")

    # ---- static helpers and configs
    D = "deep_ep.Buffer"
    add("set_num_sms", "wrong type", "a float", lambda c: c.deep_ep.Buffer.set_num_sms(20.0), "new_num_sms")
    add("set_num_sms", "out of range", "odd", lambda c: c.deep_ep.Buffer.set_num_sms(21), "new_num_sms")
    add("set_num_sms", "out of range", "zero", lambda c: c.deep_ep.Buffer.set_num_sms(0), "new_num_sms")
    add("get_low_latency_rdma_size_hint", "out of range", "hidden 0",
        lambda c: c.deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_T, 0, R, E), "hidden", where="deep_ep")
    add("get_low_latency_rdma_size_hint", "wrong type", "hidden is a string",
        lambda c: c.deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_T, "128", R, E), "hidden", where="deep_ep")
    add("get_dispatch_config", "out of range", "0 ranks", lambda c: c.deep_ep.Buffer.get_dispatch_config(0),
        "num_ranks", where="deep_ep")
    add("get_combine_config", "wrong type", "num_ranks is a string",
        lambda c: c.deep_ep.Buffer.get_combine_config("8"), "num_ranks", where="deep_ep")

    # ---- construction and destruction (checked before any communication)
    m = "__init__"
    add(m, "wrong type", "group is a string", lambda c: c.deep_ep.Buffer("world"), "group", where=D)
    add(m, "wrong type", "group None without comm", lambda c: c.deep_ep.Buffer(None), "group", where=D)
    add(m, "out of range", "num_nvl_bytes not a multiple of 128",
        lambda c: c.deep_ep.Buffer(c.group, num_nvl_bytes=1000), "num_nvl_bytes", where=D)
    add(m, "out of range", "num_rdma_bytes negative",
        lambda c: c.deep_ep.Buffer(c.group, num_rdma_bytes=-128), "num_rdma_bytes", where=D)
    add(m, "wrong type", "num_nvl_bytes is a float",
        lambda c: c.deep_ep.Buffer(c.group, num_nvl_bytes=1024.0), "num_nvl_bytes", where=D)
    add(m, "wrong type", "low_latency_mode is an int",
        lambda c: c.deep_ep.Buffer(c.group, low_latency_mode=1), "low_latency_mode", where=D)
    add(m, "out of range", "num_qps_per_rank 0",
        lambda c: c.deep_ep.Buffer(c.group, num_qps_per_rank=0), "num_qps_per_rank", where=D)
    add(m, "wrong type", "enable_shrink is a string",
        lambda c: c.deep_ep.Buffer(c.group, enable_shrink="yes"), "enable_shrink", where=D)
    add("destroy", "inconsistent", "without explicitly_destroy", lambda c: c.buf.destroy(), "explicitly_destroy")
    return cases


CASES = _cases()
_IDS = [f"{c.method}|{c.kind}|{c.label}" for c in CASES]


# --------------------------------------------------------------------------------------------------
# Rank side

def _matrix_rank(rank: int, num_ranks: int, group) -> List[Dict[str, Any]]:
    ctx = Ctx(rank, group)
    baseline: Dict[str, str] = {}
    out = []
    for case in CASES:
        rec: Dict[str, Any] = {}
        method = case.method
        if method not in baseline:
            baseline[method] = good_call(ctx, method)
        try:
            case.call(ctx)
            rec["error"] = None
        except BaseException as exc:  # noqa: BLE001
            rec["error"] = (type(exc).__name__, str(exc), isinstance(exc, ERRORS))
        try:
            rec["after"] = good_call(ctx, method) == baseline[method]
            rec["after_error"] = None
        except BaseException:  # noqa: BLE001
            rec["after"] = False
            rec["after_error"] = traceback.format_exc()
        out.append(rec)
    # The normal and low-latency paths still work end to end after everything.
    out.append({"final": good_call(ctx, "dispatch") == baseline["dispatch"] and
                good_call(ctx, "low_latency_dispatch") == baseline["low_latency_dispatch"]})
    return out


@pytest.fixture(scope="module")
def matrix_results():
    return run_ranks(_matrix_rank, R, timeout_s=240, env={"DEEP_EP_TIMEOUT_S": "30"})


@pytest.mark.parametrize("index", range(len(CASES)), ids=_IDS)
def test_bad_argument_is_rejected_and_buffer_stays_usable(matrix_results, index):
    case = CASES[index]
    where = case.where or f"deep_ep.Buffer.{case.method}"
    for rank, results in enumerate(matrix_results):
        rec = results[index]
        assert rec["error"] is not None, f"rank {rank}: {case.method} accepted a bad argument ({case.label})"
        etype, text, known = rec["error"]
        assert known, f"rank {rank}: expected TypeError/ValueError/RuntimeError, got {etype}: {text}"
        assert text.startswith(where), f"rank {rank}: the message must start with {where!r}: {text}"
        assert any(re.search(rf"`{re.escape(n)}`", text) for n in case.names), \
            f"rank {rank}: the message must name {' or '.join(case.names)}: {text}"
        assert rec["after"], f"rank {rank}: the good call after the bad one failed or differs:\n" \
                             f"{rec['after_error'] or 'different result'}"


def test_buffers_work_after_the_whole_matrix(matrix_results):
    assert all(results[-1]["final"] for results in matrix_results)


def test_matrix_covers_every_public_method_and_kind():
    import deep_ep
    public = {n for n in dir(deep_ep.Buffer) if not n.startswith("_") and callable(getattr(deep_ep.Buffer, n))}
    # Methods without arguments to get wrong, or whose argument is accepted as any value.
    no_args = {"get_num_rdma_ranks", "get_rdma_rank", "get_root_rdma_rank", "get_local_device_id",
               "is_sm90_compiled", "capture", "get_comm_stream"}
    covered = {c.method for c in CASES}
    missing = public - no_args - covered
    assert not missing, f"public methods without validation cases: {sorted(missing)}"
    kinds = {c.kind for c in CASES}
    assert kinds == {"wrong type", "wrong dtype", "wrong shape", "non-contiguous", "out of range", "inconsistent"}
