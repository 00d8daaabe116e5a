"""Normal mode on CPU ranks (gloo): get_dispatch_layout, dispatch, cached dispatch and combine.

Every rank builds *all* ranks' inputs from one shared seed, computes the expected outputs with the
global-view reference (``tests/reference.py``, written from ``docs/semantics.md``), runs the engine on
its own slice and compares every output exactly: layout tensors, received data (FP8 compared as
bytes), top-k outputs, the per-expert count list, every handle field, and combine (bit-exact, since
the contract fixes the fp32 summation order).

Spawning ranks is expensive (each imports torch), so one ``run_ranks`` call of 8 processes runs every
topology (2, 4, 8 ranks on one node; 2 nodes x 2 and 4 nodes x 2 through ``DEEP_EP_RANKS_PER_NODE``)
and every case; a module fixture holds the results and each topology is reported by its own test.
Mismatches are collected (not raised at once) so that all ranks keep issuing the same calls, and the
test reports every failing check of every rank together.

Replay a failure with ``DEEP_EP_TEST_SEED=<printed seed>``.
"""

import random
from dataclasses import dataclass, replace
from typing import List, Optional

import pytest
import torch

import reference as ref
from dist_utils import make_seed, run_ranks

NVL_BYTES = 1 << 28  # covers Config.get_nvl_buffer_size_hint of every case (R <= 8, hidden <= 1024); lazily allocated
# A case that raises on one rank leaves its peers waiting in a collective until deep_ep's timeout;
# keep it short (every collective here moves a few KB) so one engine error costs seconds, not minutes.
RANK_ENV = {"DEEP_EP_TIMEOUT_S": "30"}


@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple = (64,)              # tokens per rank, cycled over ranks
    hidden: int = 256
    num_topk: int = 4
    experts_per_rank: int = 4
    fp8: bool = False                  # x is the pair (float8_e4m3fn data, column-major scales)
    ue8m0: bool = False                # with fp8: packed UE8M0 int32 scales [T, ceil(H/512)] instead of float32
    with_topk: bool = True             # pass topk_idx/topk_weights to dispatch
    alignment: int = 1
    worst_extra: Optional[int] = None  # also dispatch with num_worst_tokens = max received + worst_extra
    config: Optional[tuple] = None     # Config(*config); None = the buffer's default
    routing: str = "random"            # random | skip_last | all_minus_one | duplicates
    minus_one: float = 0.2             # probability that a top-k slot is -1
    bias: str = "none"                 # none | one | pair
    async_mode: bool = False           # previous_event=capture(), async_finish, allocate_on_comm_stream
    combine_values: str = "normal"     # normal | wide (+-2^30 mixed in, so the fp32 summation order matters)
    combine_weights: str = "recv"      # recv (dispatch's recv_topk_weights) | random


CASES: List[Case] = [
    Case("bf16 default config, worst tokens", tokens=(48, 80, 64, 33), worst_extra=5),
    Case("fp8 pair, 2 channels, alignment 4, bias pair", tokens=(40, 72), hidden=384, fp8=True, alignment=4,
         config=(4, 6, 256, 6, 128), bias="pair", worst_extra=0),
    Case("fp8 pair with UE8M0 int32 scales, hidden 640", tokens=(20, 44), hidden=640, fp8=True, ue8m0=True,
         num_topk=3, worst_extra=2),
    Case("no top-k, hidden 136, 24 SMs, bias one", tokens=(50, 31, 64), hidden=136, with_topk=False,
         config=(24, 8, 256, 16, 128), bias="one"),
    Case("fp8, hidden 128, ranks without tokens", tokens=(0, 12, 30), hidden=128, fp8=True, num_topk=2,
         worst_extra=1),
    Case("rank 0 has no tokens, last rank receives nothing", tokens=(0, 37, 64, 20), routing="skip_last",
         num_topk=2, worst_extra=1),
    Case("all -1", tokens=(16, 9), routing="all_minus_one", bias="pair", worst_extra=3),
    Case("one expert per rank, top-1, async", tokens=(33, 17, 64), num_topk=1, experts_per_rank=1,
         async_mode=True, bias="one", worst_extra=2),
    Case("duplicate experts, wide-range combine, random weights", tokens=(60, 45), num_topk=6,
         experts_per_rank=2, routing="duplicates", alignment=3, combine_values="wide", combine_weights="random",
         bias="pair"),
    Case("fp8 async, no top-k, default config", tokens=(24, 56, 8), hidden=512, fp8=True, with_topk=False,
         async_mode=True),
    Case("fewer tokens than channels", tokens=(3, 1, 0, 5), num_topk=3, worst_extra=4, combine_values="wide"),
    Case("top-8 of many experts, hidden 512", tokens=(96, 128), hidden=512, num_topk=8, experts_per_rank=8,
         minus_one=0.05, alignment=128, async_mode=True, worst_extra=7, bias="pair", combine_weights="random"),
]


# ----------------------------------------------------------------------------------------- inputs

def _routing(case: Case, num_tokens: int, num_ranks: int, gen: torch.Generator) -> torch.Tensor:
    num_experts = case.experts_per_rank * num_ranks
    k = case.num_topk
    if case.routing == "all_minus_one":
        return torch.full((num_tokens, k), -1, dtype=torch.int64)
    if case.routing == "duplicates":
        idx = torch.randint(0, num_experts, (num_tokens, k), generator=gen)
    else:
        pool = num_experts - case.experts_per_rank if case.routing == "skip_last" else num_experts
        idx = torch.rand(num_tokens, pool, generator=gen).argsort(dim=1)[:, :k]
    drop = torch.rand(num_tokens, k, generator=gen) < case.minus_one
    return torch.where(drop, torch.full_like(idx, -1), idx).to(torch.int64).contiguous()


def _bf16(shape, gen, wide=False) -> torch.Tensor:
    values = torch.randn(shape, generator=gen)
    if wide:
        # Half of the elements are exactly +-2^30: in fp32, 2^30 + x loses x, and 2^30 - 2^30 cancels,
        # so the result depends on the summation order and only the contract's order reproduces it.
        big = torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0) * 2.0 ** 30
        values = torch.where(torch.rand(shape, generator=gen) < 0.5, big, values)
    return values.to(torch.bfloat16)


def _x(case: Case, num_tokens: int, gen: torch.Generator):
    if not case.fp8:
        return _bf16((num_tokens, case.hidden), gen)
    data = (torch.randn(num_tokens, case.hidden, generator=gen) * 64).to(torch.float8_e4m3fn)
    if case.ue8m0:
        scales = torch.randint(-2 ** 31, 2 ** 31 - 1, (num_tokens, (case.hidden + 511) // 512), generator=gen,
                               dtype=torch.int64).to(torch.int32)
    else:
        scales = torch.rand(num_tokens, case.hidden // 128, generator=gen) + 0.5
    scales = scales.T.contiguous().T  # column-major, as DeepEP's tests pass them
    return data, scales


def build_inputs(case: Case, num_ranks: int, seed: int):
    """Every rank's dispatch inputs (identical on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [case.tokens[s % len(case.tokens)] for s in range(num_ranks)]
    topk_idx = [_routing(case, tokens[s], num_ranks, gen) for s in range(num_ranks)]
    topk_weights = [torch.rand(tokens[s], case.num_topk, generator=gen) for s in range(num_ranks)]
    x = [_x(case, tokens[s], gen) for s in range(num_ranks)]
    return tokens, topk_idx, topk_weights, x


def build_combine_inputs(case: Case, num_ranks: int, seed: int, recv_rows: List[int], tokens: List[int]):
    """Every rank's combine inputs: expert outputs ``[recv_rows, H]``, weights and biases."""
    gen = torch.Generator().manual_seed(seed + 1)
    wide = case.combine_values == "wide"
    y = [_bf16((recv_rows[d], case.hidden), gen, wide) for d in range(num_ranks)]
    weights = [torch.rand(recv_rows[d], case.num_topk, generator=gen) for d in range(num_ranks)]
    bias = None
    if case.bias == "one":
        bias = [_bf16((tokens[s], case.hidden), gen, wide) for s in range(num_ranks)]
    elif case.bias == "pair":
        bias = [(_bf16((tokens[s], case.hidden), gen, wide), _bf16((tokens[s], case.hidden), gen, wide))
                for s in range(num_ranks)]
    return y, weights, bias


# ------------------------------------------------------------------------------------- comparing

class Checker:
    """Collects mismatches instead of raising, so every rank keeps making the same collective calls."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: List[str] = []
        self.prefix = ""

    def fail(self, what: str, detail: str) -> None:
        self.failures.append(f"[rank {self.rank}] {self.prefix}: {what}: {detail}")

    def true(self, what: str, condition: bool, detail: str = "") -> None:
        if not condition:
            self.fail(what, detail or "condition is false")

    def equal(self, what: str, got, expected) -> None:
        if expected is None or got is None:
            if got is not expected:
                self.fail(what, f"expected {expected!r}, got {type(got).__name__}")
            return
        if isinstance(expected, (tuple, list)) and not isinstance(expected, torch.Tensor):
            if not isinstance(got, type(expected)) or len(got) != len(expected):
                self.fail(what, f"expected a {type(expected).__name__} of {len(expected)}, got {got!r:.200}")
                return
            if expected and not isinstance(expected[0], torch.Tensor):
                if list(got) != list(expected) or not all(type(v) is int for v in got):
                    self.fail(what, f"expected {list(expected)}, got {got!r}")
                return
            for i, (g, e) in enumerate(zip(got, expected)):
                self.equal(f"{what}[{i}]", g, e)
            return
        if not isinstance(got, torch.Tensor):
            self.fail(what, f"expected a tensor, got {type(got).__name__}")
            return
        if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
            self.fail(what, f"expected {expected.dtype} {tuple(expected.shape)}, got {got.dtype} {tuple(got.shape)}")
            return
        if got.dtype in (torch.float8_e4m3fn, getattr(torch, "float8_e5m2", None)):
            got, expected = got.view(torch.uint8), expected.view(torch.uint8)
        if not torch.equal(got, expected):
            diff = (got != expected)
            where = diff.nonzero()[:5].tolist()
            shown = [(tuple(i), got[tuple(i)].item(), expected[tuple(i)].item()) for i in where]
            self.fail(what, f"{int(diff.sum())} of {got.numel()} elements differ; first (index, got, expected): "
                            f"{shown}")


HANDLE_FIELDS_ONE_NODE = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix",
                          "recv_src_idx", "is_token_in_rank", "send_head")
HANDLE_FIELDS_MULTI_NODE = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                            "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                            "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                            "send_rdma_head", "send_nvl_head")


def check_handle(chk: Checker, got, expected) -> None:
    names = HANDLE_FIELDS_ONE_NODE if len(expected) == 6 else HANDLE_FIELDS_MULTI_NODE
    if not isinstance(got, tuple) or len(got) != len(expected):
        chk.fail("handle", f"expected a {len(expected)}-tuple, got {type(got).__name__} of "
                           f"{len(got) if isinstance(got, (tuple, list)) else '?'}")
        return
    for name, g, e in zip(names, got, expected):
        chk.equal(f"handle.{name}", g, e)


def check_event(chk: Checker, what: str, event, async_mode: bool) -> None:
    from deep_ep import EventOverlap
    if not isinstance(event, EventOverlap):
        chk.fail(what, f"expected an EventOverlap, got {type(event).__name__}")
        return
    if async_mode:
        try:
            event.current_stream_wait()
            with event:
                pass
        except Exception as exc:  # noqa: BLE001
            chk.fail(what, f"waiting on the async event raised {exc!r}")


# ------------------------------------------------------------------------------------- one case

def _event_kwargs(buffer, case: Case) -> dict:
    if not case.async_mode:
        return {}
    return dict(previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True)


def run_case(buffer, rank: int, num_ranks: int, ranks_per_node: Optional[int], case: Case, seed: int,
             chk: Checker) -> None:
    import deep_ep
    topo = ref.Topology(num_ranks, ranks_per_node)
    num_experts = case.experts_per_rank * num_ranks
    tokens, topk_idx, topk_weights, x = build_inputs(case, num_ranks, seed)
    config = deep_ep.Config(*case.config) if case.config is not None else None
    num_channels = (config.num_sms if config is not None else deep_ep.Buffer.num_sms) // 2
    combine_config = config

    # ---- layout
    layouts = ref.layout_all(topk_idx, num_experts, topo)
    mine = layouts[rank]
    out = buffer.get_dispatch_layout(topk_idx[rank], num_experts, **_event_kwargs(buffer, case))
    chk.true("get_dispatch_layout returns 5 values", isinstance(out, tuple) and len(out) == 5)
    for name, got in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                          "is_token_in_rank"), out[:4]):
        chk.equal(f"layout.{name}", got, mine[name])
    check_event(chk, "layout event", out[4], case.async_mode)

    # ---- dispatch (layout inputs from the reference, so a layout bug does not hide a dispatch bug)
    in_rank = [lay["is_token_in_rank"] for lay in layouts]
    per_expert = [lay["num_tokens_per_expert"] for lay in layouts]
    ref_topk = dict(topk_idx=topk_idx, topk_weights=topk_weights) if case.with_topk else {}
    expected_all = ref.dispatch(x, in_rank, per_expert, num_experts, num_channels, topo,
                                expert_alignment=case.alignment, **ref_topk)
    expected = expected_all[rank]
    kwargs = dict(num_tokens_per_rank=mine["num_tokens_per_rank"],
                  num_tokens_per_rdma_rank=mine["num_tokens_per_rdma_rank"],
                  is_token_in_rank=mine["is_token_in_rank"], num_tokens_per_expert=mine["num_tokens_per_expert"],
                  expert_alignment=case.alignment, config=config)
    if case.with_topk:
        kwargs.update(topk_idx=topk_idx[rank], topk_weights=topk_weights[rank])
    out = buffer.dispatch(x[rank], **kwargs, **_event_kwargs(buffer, case))
    chk.true("dispatch returns 6 values", isinstance(out, tuple) and len(out) == 6)
    recv_x, recv_topk_idx, recv_topk_weights, count_list, handle, event = out
    chk.equal("recv_x", recv_x, expected["recv_x"])
    chk.equal("recv_topk_idx", recv_topk_idx, expected["recv_topk_idx"])
    chk.equal("recv_topk_weights", recv_topk_weights, expected["recv_topk_weights"])
    chk.equal("num_recv_tokens_per_expert_list", count_list, expected["num_recv_tokens_per_expert_list"])
    check_handle(chk, handle, expected["handle"])
    check_event(chk, "dispatch event", event, case.async_mode)
    if case.fp8 and isinstance(recv_x, tuple):
        chk.true("recv_x scales contiguous", recv_x[1].is_contiguous())

    # ---- cached dispatch with the handle: only recv_x comes back
    out = buffer.dispatch(x[rank], handle=handle, config=config, **_event_kwargs(buffer, case))
    chk.true("cached dispatch returns 6 values", isinstance(out, tuple) and len(out) == 6)
    chk.equal("cached recv_x", out[0], expected["recv_x"])
    for i in range(1, 5):
        chk.true(f"cached dispatch output {i} is None", out[i] is None, f"got {type(out[i]).__name__}")
    check_event(chk, "cached dispatch event", out[5], case.async_mode)

    # ---- combine with the handle
    recv_rows = [e["num_recv_tokens"] for e in expected_all]
    y, random_weights, bias = build_combine_inputs(case, num_ranks, seed, recv_rows, tokens)
    if case.with_topk:
        weights = random_weights if case.combine_weights == "random" else [e["recv_topk_weights"]
                                                                           for e in expected_all]
    else:
        weights = None
    expected_combine = ref.combine(y, in_rank, topo, topk_weights=weights, bias=bias, ranks=[rank])[rank]
    my_bias = None if bias is None else bias[rank]
    combine_kwargs = dict(topk_weights=None if weights is None else weights[rank], bias=my_bias,
                          config=combine_config)
    out = buffer.combine(y[rank], handle, **combine_kwargs, **_event_kwargs(buffer, case))
    chk.true("combine returns 3 values", isinstance(out, tuple) and len(out) == 3)
    chk.equal("combined_x", out[0], expected_combine[0])
    chk.equal("combined_topk_weights", out[1], expected_combine[1])
    check_event(chk, "combine event", out[2], case.async_mode)
    # the same handle serves a second combine
    out = buffer.combine(y[rank], handle, **combine_kwargs)
    chk.equal("second combine with the same handle", out[0], expected_combine[0])

    # ---- num_worst_tokens
    if case.worst_extra is None or not case.with_topk:
        return
    worst = max(max(recv_rows), 1) + case.worst_extra
    expected_worst = ref.dispatch(x, in_rank, per_expert, num_experts, num_channels, topo,
                                  expert_alignment=case.alignment, num_worst_tokens=worst, ranks=[rank],
                                  **ref_topk)[rank]
    out = buffer.dispatch(x[rank], **kwargs, num_worst_tokens=worst, **_event_kwargs(buffer, case))
    w_recv_x, w_idx, w_weights, w_list, w_handle, w_event = out
    chk.prefix += f" (num_worst_tokens={worst})"
    chk.equal("recv_x", w_recv_x, expected_worst["recv_x"])
    chk.equal("recv_topk_idx", w_idx, expected_worst["recv_topk_idx"])
    chk.equal("recv_topk_weights", w_weights, expected_worst["recv_topk_weights"])
    chk.true("count list is empty", w_list == [], f"got {w_list!r}")
    check_handle(chk, w_handle, expected_worst["handle"])
    check_event(chk, "dispatch event", w_event, case.async_mode)
    # the valid prefix equals the normal dispatch exactly
    n = expected["num_recv_tokens"]
    if isinstance(w_recv_x, tuple) and isinstance(recv_x, tuple):
        chk.equal("prefix of recv_x", w_recv_x[0][:n], recv_x[0])
        chk.equal("prefix of recv_x scales", w_recv_x[1][:n], recv_x[1])
    elif isinstance(w_recv_x, torch.Tensor) and isinstance(recv_x, torch.Tensor):
        chk.equal("prefix of recv_x", w_recv_x[:n], recv_x)
    if isinstance(w_idx, torch.Tensor) and isinstance(recv_topk_idx, torch.Tensor):
        chk.equal("prefix of recv_topk_idx", w_idx[:n], recv_topk_idx)
    # cached dispatch with the padded handle, then combine with padded rows (the padding is ignored)
    out = buffer.dispatch(x[rank], handle=w_handle, config=config)
    chk.equal("cached recv_x", out[0], expected_worst["recv_x"])
    gen = torch.Generator().manual_seed(seed + 2)
    garbage = _bf16((worst - n, case.hidden), gen, wide=True)
    y_padded = torch.cat([y[rank], garbage])
    w_padded = None
    if weights is not None:
        w_padded = torch.cat([weights[rank], torch.rand(worst - n, case.num_topk, generator=gen)])
    out = buffer.combine(y_padded, w_handle, topk_weights=w_padded, bias=my_bias, config=combine_config)
    chk.equal("combined_x", out[0], expected_combine[0])
    chk.equal("combined_topk_weights", out[1], expected_combine[1])


def _new_buffer(group, multi_node: bool):
    import deep_ep
    return deep_ep.Buffer(group, num_nvl_bytes=NVL_BYTES, num_rdma_bytes=NVL_BYTES if multi_node else 0,
                          explicitly_destroy=True)


def _run_topology(rank: int, group, num_ranks: int, ranks_per_node: Optional[int], seed: int,
                  cases: List[Case]) -> List[str]:
    import traceback
    import torch.distributed as dist
    multi_node = ranks_per_node is not None and ranks_per_node < num_ranks
    buffer = _new_buffer(group, multi_node)
    chk = Checker(rank)
    chk.prefix = "buffer attributes"
    chk.true("rank", buffer.rank == rank, f"got {buffer.rank}")
    chk.true("group_size", buffer.group_size == num_ranks, f"got {buffer.group_size}")
    chk.true("engine", buffer.engine in ("portable", "cuda"), f"got {buffer.engine!r}")
    want_per_node = num_ranks if ranks_per_node is None else ranks_per_node
    chk.true("num_ranks_per_node", buffer.num_ranks_per_node == want_per_node, f"got {buffer.num_ranks_per_node}")
    for index, case in enumerate(cases):
        case = _adapt(case, num_ranks)
        chk.prefix = f"case {case.name!r} (seed {seed + 10 * index})"
        raised = 0
        try:
            run_case(buffer, rank, num_ranks, ranks_per_node, case, seed + 10 * index, chk)
        except Exception:  # noqa: BLE001 - an engine error on one rank breaks the buffer on all of them
            chk.fail("raised", traceback.format_exc())
            raised = 1
        # If any rank raised, every rank drops the (now unusable) buffer and builds a new one, so the
        # remaining cases still run and report.
        flag = torch.tensor([raised])
        dist.all_reduce(flag, group=group)
        if flag.item():
            buffer = _new_buffer(group, multi_node)
    buffer.destroy()
    return chk.failures


def normal_mode_worker(rank: int, world_size: int, world_group, topologies, seed: int,
                       cases: List[Case]) -> dict:
    """Runs every topology in one set of processes (spawning ranks costs far more than the cases):
    a topology of R ranks uses ranks 0..R-1 through a sub-group, and its node layout is set through
    DEEP_EP_RANKS_PER_NODE before its Buffer is built. Returns {topology id: [failure lines]}."""
    import os
    import traceback
    import torch.distributed as dist
    results = {}
    for name, num_ranks, ranks_per_node in topologies:
        group = dist.new_group(list(range(num_ranks)))  # every rank takes part in new_group
        if rank < num_ranks:
            if ranks_per_node is None:
                os.environ.pop("DEEP_EP_RANKS_PER_NODE", None)
            else:
                os.environ["DEEP_EP_RANKS_PER_NODE"] = str(ranks_per_node)
            # "-gloo" topologies force the gloo transport; the others use the default (shared memory).
            os.environ["DEEP_EP_TRANSPORT"] = "gloo" if name.endswith("-gloo") else "auto"
            try:
                results[name] = _run_topology(rank, group, num_ranks, ranks_per_node, seed, cases)
            except Exception:  # noqa: BLE001 - report and keep the other topologies running
                results[name] = [f"[rank {rank}] raised:\n{traceback.format_exc()}"]
        dist.barrier(world_group)  # keep the topologies apart
    return results


def _adapt(case: Case, num_ranks: int) -> Case:
    """Shrink top-k where a topology has too few experts for the case."""
    num_experts = case.experts_per_rank * num_ranks
    pool = num_experts - case.experts_per_rank if case.routing == "skip_last" else num_experts
    if case.routing != "duplicates" and case.num_topk > pool:
        return replace(case, num_topk=pool)
    return case


# (id, ranks, ranks per node or None for one node)
TOPOLOGIES = [("R2", 2, None), ("R4", 4, None), ("R8", 8, None), ("R4-2nodes", 4, 2), ("R8-4nodes", 8, 2),
              ("R4-gloo", 4, None), ("R4-2nodes-gloo", 4, 2)]
WORLD_SIZE = max(num_ranks for _, num_ranks, _ in TOPOLOGIES)


@pytest.fixture(scope="module")
def normal_mode_results():
    seed = make_seed()
    per_rank = run_ranks(normal_mode_worker, WORLD_SIZE, TOPOLOGIES, seed, CASES, timeout_s=480, env=RANK_ENV)
    merged = {name: [] for name, _, _ in TOPOLOGIES}
    for results in per_rank:
        for name, lines in results.items():
            merged[name].extend(lines)
    return seed, merged


@pytest.mark.parametrize("topology", [name for name, _, _ in TOPOLOGIES])
def test_normal_mode(normal_mode_results, topology):
    seed, merged = normal_mode_results
    report = merged[topology]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:60])


# ------------------------------------------------------------------------------ slow random sweep

def random_cases(seed: int, count: int) -> List[Case]:
    """`count` random cases (sizes, routing, dtypes, options), reproducible from `seed`."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        fp8 = rng.random() < 0.3
        with_topk = rng.random() < 0.8
        cases.append(Case(
            name=f"random #{i}",
            tokens=tuple(rng.choice([0, 1, 7, rng.randint(1, 256)]) for _ in range(3)),
            hidden=rng.choice([128, 256, 384, 1024]) if fp8 else rng.choice([8, 24, 136, 256, 392, 1024]),
            num_topk=rng.randint(1, 9),
            experts_per_rank=rng.choice([1, 2, 4, 8]),
            fp8=fp8,
            ue8m0=fp8 and rng.random() < 0.3,
            with_topk=with_topk,
            alignment=rng.choice([1, 2, 4, 16]),
            worst_extra=rng.choice([None, 0, 3]) if with_topk else None,
            config=rng.choice([None, (2, 6, 256, 6, 128), (4, 6, 256, 6, 128), (24, 8, 256, 16, 128)]),
            routing=rng.choice(["random", "random", "skip_last", "duplicates", "all_minus_one"]),
            minus_one=rng.choice([0.0, 0.2, 0.6]),
            bias=rng.choice(["none", "one", "pair"]),
            async_mode=rng.random() < 0.3,
            combine_values=rng.choice(["normal", "wide"]),
            combine_weights=rng.choice(["recv", "random"]),
        ))
    return cases


SWEEP_TOPOLOGIES = [("R8", 8, None), ("R8-4nodes", 8, 2), ("R8-2nodes", 8, 4), ("R4-2nodes", 4, 2)]


@pytest.mark.slow
def test_normal_mode_random_sweep():
    seed = make_seed()
    cases = random_cases(seed, 12)
    per_rank = run_ranks(normal_mode_worker, 8, SWEEP_TOPOLOGIES, seed, cases, timeout_s=600, env=RANK_ENV)
    report = [line for results in per_rank for lines in results.values() for line in lines]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:60])
