"""Cases and per-rank workers for the CUDA engine's GPU tests (imported by the pytest module, the
sanitizer script and the device check; nothing here runs without a GPU).

Every rank builds all ranks' inputs from one seed, runs each operation twice, on a Buffer with the
CUDA engine and on a Buffer with the portable engine (the oracle, over the same gloo group), and
compares every output and every handle field bit for bit: the combine too, since both engines sum in
fp32 in the order docs/semantics.md fixes. Mismatches are collected, not raised, so that all ranks
keep issuing the same collective calls.

All ranks share one GPU (``cuda:0``, or ``rank % device_count``) as separate processes: the CUDA
engine's peers are then other processes on the same device, reached through CUDA IPC.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

NVL_BYTES = 64 << 20


@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple = (48, 80, 64, 33)     # per rank, cycled
    hidden: int = 256
    num_topk: int = 4
    experts_per_rank: int = 4
    fp8: bool = False
    with_topk: bool = True
    alignment: int = 1
    worst_extra: Optional[int] = 3       # also a num_worst_tokens dispatch (None: skip)
    config: tuple = (4, 6, 32)           # (num_sms, nvl send chunk, nvl ring slots)
    minus_one: float = 0.2
    routing: str = "random"              # random | all_minus_one | skip_last
    bias: str = "none"                   # none | one | pair
    wide: bool = False                   # combine inputs with spread exponents (order-sensitive sums)


CASES: List[Case] = [
    Case("bf16, 2 channels, ring of 32 (wraps), worst tokens"),
    Case("fp8 pair with column-major scales, alignment 4, bias pair", tokens=(40, 72), hidden=384, fp8=True,
         alignment=4, bias="pair", wide=True),
    Case("no top-k, hidden 136 (odd int4 count), bias one, 3 channels", tokens=(50, 31, 64), hidden=136,
         with_topk=False, config=(6, 4, 16), bias="one", worst_extra=None),
    Case("rank 0 has no tokens, last rank receives nothing", tokens=(0, 37, 64, 20), routing="skip_last",
         num_topk=2, worst_extra=1),
    Case("all -1", tokens=(16, 9), routing="all_minus_one", bias="pair", worst_extra=2),
    Case("ring of 8 with chunks of 6, top-8, wide combine", tokens=(96, 57), num_topk=8, experts_per_rank=8,
         config=(4, 6, 8), wide=True, bias="pair"),
    Case("hidden 7168 bf16, 4 channels, ring of 64", tokens=(64, 40), hidden=7168, config=(8, 6, 64),
         worst_extra=None),
]


def emulated() -> bool:
    """``DEEP_EP_ENGINE=emulated`` in the ranks' environment: the same cases on CPU tensors through the
    kernel emulator (tests/test_emulated.py), the compiled Buffer's engine is then "emulated"."""
    return os.environ.get("DEEP_EP_ENGINE") == "emulated"


def compiled_engine() -> str:
    return "emulated" if emulated() else "cuda"


def _device(rank: int) -> torch.device:
    """This rank's GPU: LOCAL_RANK (set by multi-node launchers) or the rank, modulo the devices."""
    if emulated():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


def synchronize() -> None:
    if not emulated():
        torch.cuda.synchronize()


def _routing(case: Case, num_tokens: int, num_ranks: int, gen: torch.Generator) -> torch.Tensor:
    num_experts = case.experts_per_rank * num_ranks
    k = case.num_topk
    if case.routing == "all_minus_one":
        return torch.full((num_tokens, k), -1, dtype=torch.int64)
    pool = num_experts - case.experts_per_rank if case.routing == "skip_last" else num_experts
    k = min(k, pool)
    idx = torch.rand(num_tokens, pool, generator=gen).argsort(dim=1)[:, :k]
    drop = torch.rand(num_tokens, k, generator=gen) < case.minus_one
    idx = torch.where(drop, torch.full_like(idx, -1), idx).to(torch.int64)
    if k < case.num_topk:
        idx = torch.cat([idx, torch.full((num_tokens, case.num_topk - k), -1, dtype=torch.int64)], 1)
    return idx.contiguous()


def _bf16(shape, gen, wide=False) -> torch.Tensor:
    values = torch.randn(shape, generator=gen)
    if wide:
        values = values * torch.pow(2.0, torch.randint(-14, 15, shape, generator=gen).float())
    return values.to(torch.bfloat16)


def build_inputs(case: Case, num_ranks: int, rank: int, seed: int, device: torch.device):
    """This rank's dispatch inputs (every rank draws all ranks' inputs so the generators agree)."""
    gen = torch.Generator().manual_seed(seed)
    out = None
    for s in range(num_ranks):
        t = case.tokens[s % len(case.tokens)]
        topk_idx = _routing(case, t, num_ranks, gen)
        topk_weights = torch.rand(t, case.num_topk, generator=gen)
        if case.fp8:
            data = (torch.randn(t, case.hidden, generator=gen) * 64).to(torch.float8_e4m3fn)
            scales = torch.rand(t, case.hidden // 128, generator=gen) + 0.5
            x = (data, scales)
        else:
            x = _bf16((t, case.hidden), gen)
        if s == rank:
            out = (topk_idx, topk_weights, x)
    topk_idx, topk_weights, x = out
    if case.fp8:
        data, scales = x
        # column-major scales (strides (1, T)), as DeepEP's tests pass them
        x = (data.to(device), scales.t().contiguous().to(device).t())
    else:
        x = x.to(device)
    return topk_idx.to(device), topk_weights.to(device), x


class Checker:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.prefix = ""
        self.failures: List[str] = []

    def fail(self, what: str, detail: str) -> None:
        self.failures.append(f"[rank {self.rank}] {self.prefix}: {what}: {detail}")

    def true(self, what: str, cond: bool, detail: str = "") -> None:
        if not cond:
            self.fail(what, detail or "condition is false")

    def equal(self, what: str, got, want) -> None:
        if isinstance(want, (tuple, list)) and not isinstance(want, torch.Tensor):
            if not isinstance(got, type(want)) or len(got) != len(want):
                self.fail(what, f"expected a {type(want).__name__} of {len(want)}, got {type(got).__name__}")
                return
            if want and not isinstance(want[0], torch.Tensor):
                if list(got) != list(want):
                    self.fail(what, f"expected {list(want)}, got {list(got)}")
                return
            for i, (g, w) in enumerate(zip(got, want)):
                self.equal(f"{what}[{i}]", g, w)
            return
        if want is None or got is None:
            if got is not want:
                self.fail(what, f"expected {want!r}, got {type(got).__name__}")
            return
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            self.fail(what, f"expected {want.dtype} {tuple(want.shape)}, got {got.dtype} {tuple(got.shape)}")
            return
        g, w = got.detach().cpu(), want.detach().cpu()
        if g.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            g, w = g.view(torch.uint8), w.view(torch.uint8)
        if not torch.equal(g, w):
            diff = g != w
            where = diff.nonzero()[:4].tolist()
            shown = [(tuple(i), g[tuple(i)].item(), w[tuple(i)].item()) for i in where]
            extra = ""
            if g.is_floating_point():
                extra = f", max |diff| {float((g.float() - w.float()).abs().max()):.3g}"
            self.fail(what, f"{int(diff.sum())} of {g.numel()} differ{extra}; first (index, cuda, portable): {shown}")


HANDLE_FIELDS = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
                 "is_token_in_rank", "send_head")
HANDLE_FIELDS_MULTI_NODE = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                            "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                            "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                            "send_rdma_head", "send_nvl_head")


def _combine_inputs(case: Case, rows: int, tokens: int, seed: int, device: torch.device, weights=None):
    """Combine inputs: rows, top-k weights (random, or ``weights`` when given) and the case's biases."""
    gen = torch.Generator().manual_seed(seed)
    y = _bf16((rows, case.hidden), gen, case.wide).to(device)
    w = torch.rand(rows, case.num_topk, generator=gen).to(device) if case.with_topk else None
    if weights is not None:
        w = weights
    bias = None
    if case.bias == "one":
        bias = _bf16((tokens, case.hidden), gen, case.wide).to(device)
    elif case.bias == "pair":
        bias = (_bf16((tokens, case.hidden), gen, case.wide).to(device),
                _bf16((tokens, case.hidden), gen, case.wide).to(device))
    return y, w, bias


def run_case(bufs, rank: int, num_ranks: int, case: Case, seed: int, chk: Checker) -> None:
    import deep_ep
    cuda_buf, port_buf = bufs
    device = _device(rank)
    num_experts = case.experts_per_rank * num_ranks
    topk_idx, topk_weights, x = build_inputs(case, num_ranks, rank, seed, device)
    config = deep_ep.Config(case.config[0], case.config[1], case.config[2], 6, 128)

    # ---- layout
    lay_c = cuda_buf.get_dispatch_layout(topk_idx, num_experts)
    lay_p = port_buf.get_dispatch_layout(topk_idx, num_experts)
    for i, name in enumerate(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                              "is_token_in_rank")):
        chk.equal(f"layout.{name}", lay_c[i], lay_p[i])
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = lay_p[:4]

    # ---- dispatch
    kwargs = dict(num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                  num_tokens_per_expert=num_tokens_per_expert, expert_alignment=case.alignment, config=config)
    if case.with_topk:
        kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
    out_c = cuda_buf.dispatch(x, **kwargs)
    out_p = port_buf.dispatch(x, **kwargs)
    for i, name in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list")):
        chk.equal(name, out_c[i], out_p[i])
    for name, g, w in zip(HANDLE_FIELDS, out_c[4], out_p[4]):
        chk.equal(f"handle.{name}", g, w)
    handle_c, handle_p = out_c[4], out_p[4]

    # ---- cached dispatch (each engine with its own handle; they are equal when the above passed)
    cached_c = cuda_buf.dispatch(x, handle=handle_c, config=config)
    cached_p = port_buf.dispatch(x, handle=handle_p, config=config)
    chk.equal("cached recv_x", cached_c[0], cached_p[0])

    # ---- combine (twice: the handle is reusable)
    rows = handle_p[3].size(0)
    y, w, bias = _combine_inputs(case, rows, topk_idx.size(0), seed + 1, device)
    comb_p = port_buf.combine(y, handle_p, topk_weights=w, bias=bias, config=config)
    for attempt in range(2):
        comb_c = cuda_buf.combine(y, handle_c, topk_weights=w, bias=bias, config=config)
        chk.equal(f"combined_x (call {attempt + 1})", comb_c[0], comb_p[0])
        chk.equal(f"combined_topk_weights (call {attempt + 1})", comb_c[1], comb_p[1])

    # ---- num_worst_tokens: padded outputs, then cached dispatch and combine with the padded handle
    if case.worst_extra is None or not case.with_topk:
        return
    worst = max(int(handle_p[0][-1].max()), 1) + case.worst_extra
    chk.prefix += f" (num_worst_tokens={worst})"
    out_c = cuda_buf.dispatch(x, **kwargs, num_worst_tokens=worst)
    out_p = port_buf.dispatch(x, **kwargs, num_worst_tokens=worst)
    for i, name in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list")):
        chk.equal(name, out_c[i], out_p[i])
    for name, g, wv in zip(HANDLE_FIELDS, out_c[4], out_p[4]):
        chk.equal(f"handle.{name}", g, wv)
    cached_c = cuda_buf.dispatch(x, handle=out_c[4], config=config)
    cached_p = port_buf.dispatch(x, handle=out_p[4], config=config)
    chk.equal("cached recv_x", cached_c[0], cached_p[0])
    gen = torch.Generator().manual_seed(seed + 2)
    y_pad = torch.cat([y, _bf16((worst - rows, case.hidden), gen, True).to(device)])
    w_pad = None if w is None else torch.cat([w, torch.rand(worst - rows, case.num_topk, generator=gen).to(device)])
    comb_c = cuda_buf.combine(y_pad, out_c[4], topk_weights=w_pad, bias=bias, config=config)
    comb_p = port_buf.combine(y_pad, out_p[4], topk_weights=w_pad, bias=bias, config=config)
    chk.equal("combined_x", comb_c[0], comb_p[0])
    chk.equal("combined_topk_weights", comb_c[1], comb_p[1])


def run_async_case(bufs, rank: int, num_ranks: int, seed: int, chk: Checker) -> None:
    """previous_event / async_finish / allocate_on_comm_stream on the CUDA engine."""
    import deep_ep
    cuda_buf, port_buf = bufs
    case = Case("async", tokens=(40, 29))
    device = _device(rank)
    topk_idx, topk_weights, x = build_inputs(case, num_ranks, rank, seed, device)
    num_experts = case.experts_per_rank * num_ranks
    config = deep_ep.Config(*case.config, 6, 128)
    ev = dict(async_finish=True, allocate_on_comm_stream=True)
    lay = cuda_buf.get_dispatch_layout(topk_idx, num_experts, previous_event=cuda_buf.capture(), **ev)
    lay[-1].current_stream_wait()
    kwargs = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                  topk_idx=topk_idx, topk_weights=topk_weights, config=config)
    out_c = cuda_buf.dispatch(x, **kwargs, previous_event=cuda_buf.capture(), **ev)
    out_c[-1].current_stream_wait()
    out_p = port_buf.dispatch(x, **kwargs)
    chk.equal("async recv_x", out_c[0], out_p[0])
    y, w, _ = _combine_inputs(case, out_p[4][3].size(0), topk_idx.size(0), seed + 1, device)
    comb_c = cuda_buf.combine(y, out_c[4], topk_weights=w, config=config, previous_event=cuda_buf.capture(), **ev)
    comb_c[-1].current_stream_wait()
    comb_p = port_buf.combine(y, out_p[4], topk_weights=w, config=config)
    chk.equal("async combined_x", comb_c[0], comb_p[0])


def run_graph_case(bufs, rank: int, num_ranks: int, seed: int, chk: Checker, config=None) -> None:
    """Capture a num_worst_tokens dispatch (no CPU sync) in a CUDA graph on every rank, replay it with
    new data in the same input tensors, and compare with an eager dispatch of that data (one node or
    several: every field of either handle)."""
    import deep_ep
    cuda_buf, _ = bufs
    case = Case("graph", tokens=(48, 33))
    device = _device(rank)
    topk_idx, topk_weights, x = build_inputs(case, num_ranks, rank, seed, device)
    num_experts = case.experts_per_rank * num_ranks
    config = config if config is not None else deep_ep.Config(*case.config, 6, 128)
    lay = cuda_buf.get_dispatch_layout(topk_idx, num_experts)
    kwargs = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                  num_tokens_per_expert=lay[2], topk_idx=topk_idx, topk_weights=topk_weights, config=config,
                  num_worst_tokens=max(case.tokens) * num_ranks)  # the same on every rank
    cuda_buf.dispatch(x, **kwargs)  # warm-up outside the capture (first-use host work)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_buf.dispatch(x, **kwargs)
    for attempt in range(2):
        x.copy_(_bf16(tuple(x.shape), torch.Generator().manual_seed(seed + 100 * attempt)).to(device))
        graph.replay()
        torch.cuda.synchronize()
        eager = cuda_buf.dispatch(x, **kwargs)
        torch.cuda.synchronize()
        chk.equal(f"graph replay {attempt + 1}: recv_x", captured[0], eager[0])
        chk.equal(f"graph replay {attempt + 1}: recv_topk_idx", captured[1], eager[1])
        names = HANDLE_FIELDS if len(eager[4]) == 6 else HANDLE_FIELDS_MULTI_NODE
        for name, g, w in zip(names, captured[4], eager[4]):
            chk.equal(f"graph replay {attempt + 1}: handle.{name}", g, w)
    del graph


def make_buffers(group, nvl_bytes: int = NVL_BYTES, **buffer_kwargs):
    """(CUDA-engine Buffer, portable Buffer) on this rank; the first is forced with DEEP_EP_ENGINE=cuda.
    ``buffer_kwargs`` go to both (e.g. ``num_rdma_bytes``)."""
    import deep_ep
    saved = os.environ.get("DEEP_EP_ENGINE")
    try:
        os.environ["DEEP_EP_ENGINE"] = compiled_engine()
        cuda_buf = deep_ep.Buffer(group, num_nvl_bytes=nvl_bytes, explicitly_destroy=True, **buffer_kwargs)
        os.environ["DEEP_EP_ENGINE"] = "portable"
        port_buf = deep_ep.Buffer(group, num_nvl_bytes=nvl_bytes, explicitly_destroy=True, **buffer_kwargs)
    finally:
        if saved is None:
            os.environ.pop("DEEP_EP_ENGINE", None)
        else:
            os.environ["DEEP_EP_ENGINE"] = saved
    return cuda_buf, port_buf


def intranode_worker(rank: int, num_ranks: int, group, seed: int, cases: List[Case], extras: bool) -> List[str]:
    if not emulated():
        torch.cuda.set_device(_device(rank))
    bufs = make_buffers(group)
    chk = Checker(rank)
    chk.prefix = "buffer"
    chk.true("engine", bufs[0].engine == compiled_engine(), f"got {bufs[0].engine!r}: {bufs[0].engine_reason}")
    for i, case in enumerate(cases):
        chk.prefix = f"case {case.name!r} (seed {seed + 10 * i})"
        run_case(bufs, rank, num_ranks, case, seed + 10 * i, chk)
    if extras:
        chk.prefix = "async"
        run_async_case(bufs, rank, num_ranks, seed + 7, chk)
        chk.prefix = "CUDA graph"
        run_graph_case(bufs, rank, num_ranks, seed + 9, chk)
    synchronize()
    for b in bufs:
        b.destroy()
    return chk.failures
