"""Argument validation of the normal-mode API, `Config`, `Buffer` construction and `set_num_sms`.

One test per bad-input rule. Every rule gives the same bad input on every rank and expects every
rank to raise the stated error type with a message that names the argument (DeepEP-style messages,
e.g. ``deep_ep.Buffer.dispatch: `topk_idx` must be torch.int64 (deep_ep.topk_idx_t), got torch.int32``),
and then checks that the buffer still works: a good dispatch + combine afterwards gives the
reference result.

All rules run in one spawned set of 4 ranks (spawning is the expensive part); a module fixture keeps
the per-rule outcome and each rule is reported by its own test. Low-latency rules live with the
low-latency tests.
"""

import os
import re
import traceback
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch

import reference as ref
from dist_utils import make_seed, run_ranks

NUM_RANKS = 4
NVL_BYTES = 1 << 28  # covers the size hints of the calls here; lazily allocated, never touched
NUM_TOKENS = 16
HIDDEN = 128
NUM_TOPK = 2
NUM_EXPERTS = 2 * NUM_RANKS
VALUE_OR_TYPE = (ValueError, TypeError)


class Rule(NamedTuple):
    call: Callable            # call(ctx) makes the bad call
    errors: Tuple[type, ...]  # accepted exception types
    match: str                # regex the message must contain (the argument's name)
    buffer: Optional[str]     # ctx attribute of the buffer that must still work afterwards (None: no buffer)


# ------------------------------------------------------------------------------------------ context

class Context:
    """Good inputs and buffers on one rank; bad inputs are derived from them rule by rule."""

    def __init__(self, rank: int, group, pair_group, seed: int) -> None:
        import deep_ep
        self.deep_ep = deep_ep
        self.rank = rank
        self.group = group
        gen = torch.Generator().manual_seed(seed)
        self.topk_idx_all = [torch.rand(NUM_TOKENS, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :NUM_TOPK].contiguous()
                             for _ in range(NUM_RANKS)]
        self.topk_weights_all = [torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen) for _ in range(NUM_RANKS)]
        self.x_all = [torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16) for _ in range(NUM_RANKS)]
        self.topk_idx = self.topk_idx_all[rank]
        self.topk_weights = self.topk_weights_all[rank]
        self.x = self.x_all[rank]

        self.buffer = deep_ep.Buffer(group, num_nvl_bytes=NVL_BYTES)
        os.environ["DEEP_EP_RANKS_PER_NODE"] = "2"
        try:
            self.buffer_nodes = deep_ep.Buffer(group, num_nvl_bytes=NVL_BYTES, num_rdma_bytes=NVL_BYTES)
        finally:
            os.environ.pop("DEEP_EP_RANKS_PER_NODE", None)
        self.buffer_pair = deep_ep.Buffer(pair_group, num_nvl_bytes=NVL_BYTES)

        self.expected = {}
        self.layout = {}
        for name, topo in (("buffer", ref.Topology(NUM_RANKS)), ("buffer_nodes", ref.Topology(NUM_RANKS, 2))):
            layouts = ref.layout_all(self.topk_idx_all, NUM_EXPERTS, topo)
            in_rank = [lay["is_token_in_rank"] for lay in layouts]
            recv = ref.dispatch(self.x_all, in_rank, [lay["num_tokens_per_expert"] for lay in layouts], NUM_EXPERTS,
                                deep_ep.Buffer.num_sms // 2, topo, topk_idx=self.topk_idx_all,
                                topk_weights=self.topk_weights_all)
            combined = ref.combine([r["recv_x"] for r in recv], in_rank, topo, ranks=[rank])[rank][0]
            self.layout[name] = layouts[rank]
            self.expected[name] = (recv[rank]["recv_x"], combined)

        # handles: this buffer's, the multi-node buffer's, and a 2-rank buffer's
        self.handle = self.good_dispatch(self.buffer)[4]
        self.handle_nodes = self.good_dispatch(self.buffer_nodes, "buffer_nodes")[4]
        pair_layout = self.buffer_pair.get_dispatch_layout(self.topk_idx, NUM_EXPERTS)
        self.handle_pair = self.buffer_pair.dispatch(
            self.x, num_tokens_per_rank=pair_layout[0], is_token_in_rank=pair_layout[3],
            num_tokens_per_expert=pair_layout[2], topk_idx=self.topk_idx, topk_weights=self.topk_weights)[4]

    def layout_kwargs(self, name: str = "buffer") -> dict:
        lay = self.layout[name]
        return dict(num_tokens_per_rank=lay["num_tokens_per_rank"],
                    num_tokens_per_rdma_rank=lay["num_tokens_per_rdma_rank"],
                    is_token_in_rank=lay["is_token_in_rank"], num_tokens_per_expert=lay["num_tokens_per_expert"])

    def dispatch_kwargs(self, name: str = "buffer", **overrides) -> dict:
        kwargs = dict(self.layout_kwargs(name), topk_idx=self.topk_idx, topk_weights=self.topk_weights)
        kwargs.update(overrides)
        return kwargs

    def good_dispatch(self, buffer, name: str = "buffer"):
        return buffer.dispatch(self.x, **self.dispatch_kwargs(name))

    def check_still_works(self, name: str) -> Optional[str]:
        buffer = getattr(self, name)
        try:
            recv_x, _, _, _, handle, _ = self.good_dispatch(buffer, name)
            combined = buffer.combine(recv_x, handle)[0]
        except Exception:  # noqa: BLE001
            return f"a good dispatch + combine afterwards raised:\n{traceback.format_exc()}"
        want_recv, want_combined = self.expected[name]
        if not torch.equal(recv_x, want_recv) or not torch.equal(combined, want_combined):
            return "a good dispatch + combine afterwards returned wrong results"
        return None


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().T


def _fp8(ctx: Context, scales_cols: int = HIDDEN // 128, scales_dtype=torch.float32, scales_rows: int = NUM_TOKENS):
    data = ctx.x.float().to(torch.float8_e4m3fn)
    scales = _column_major(torch.ones(scales_rows, scales_cols, dtype=scales_dtype))
    return data, scales


def _bad_topk(ctx: Context, value: int) -> torch.Tensor:
    idx = ctx.topk_idx.clone()
    idx[NUM_TOKENS // 2, 0] = value
    return idx


# -------------------------------------------------------------------------------------------- rules

RULES: Dict[str, Rule] = {}


def rule(name: str, errors, match: str, buffer: Optional[str] = "buffer"):
    def register(fn):
        RULES[name] = Rule(fn, errors, match, buffer)
        return fn
    return register


# get_dispatch_layout
@rule("layout: topk_idx int32", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.get_dispatch_layout(ctx.topk_idx.to(torch.int32), NUM_EXPERTS)


@rule("layout: topk_idx 1-D", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.get_dispatch_layout(ctx.topk_idx[:, 0].contiguous(), NUM_EXPERTS)


@rule("layout: topk_idx not contiguous", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.get_dispatch_layout(_column_major(ctx.topk_idx), NUM_EXPERTS)


@rule("layout: expert id >= num_experts", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.get_dispatch_layout(_bad_topk(ctx, NUM_EXPERTS), NUM_EXPERTS)


@rule("layout: expert id < -1", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.get_dispatch_layout(_bad_topk(ctx, -2), NUM_EXPERTS)


@rule("layout: num_experts not a multiple of num_ranks", VALUE_OR_TYPE, "num_experts")
def _(ctx):
    ctx.buffer.get_dispatch_layout(ctx.topk_idx, NUM_EXPERTS + 1)


@rule("layout: top-k > 32", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    idx = torch.arange(33, dtype=torch.int64).repeat(NUM_TOKENS, 1)
    ctx.buffer.get_dispatch_layout(idx, 36)


@rule("layout: allocate_on_comm_stream without previous_event", VALUE_OR_TYPE, "allocate_on_comm_stream")
def _(ctx):
    ctx.buffer.get_dispatch_layout(ctx.topk_idx, NUM_EXPERTS, async_finish=True, allocate_on_comm_stream=True)


@rule("layout: previous_event not an EventOverlap", VALUE_OR_TYPE, "previous_event")
def _(ctx):
    ctx.buffer.get_dispatch_layout(ctx.topk_idx, NUM_EXPERTS, previous_event="event")


# dispatch: x
@rule("dispatch: x float32", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(ctx.x.float(), **ctx.dispatch_kwargs())


@rule("dispatch: x 3-D", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(ctx.x.view(NUM_TOKENS, 2, HIDDEN // 2), **ctx.dispatch_kwargs())


@rule("dispatch: x not contiguous", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(_column_major(ctx.x), **ctx.dispatch_kwargs())


@rule("dispatch: hidden * elem_size % 16 != 0", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(ctx.x[:, :100].contiguous(), **ctx.dispatch_kwargs())


@rule("dispatch: fp8 scales with the wrong column count", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(_fp8(ctx, scales_cols=2), **ctx.dispatch_kwargs())


@rule("dispatch: fp8 scales with the wrong row count", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(_fp8(ctx, scales_rows=NUM_TOKENS - 1), **ctx.dispatch_kwargs())


@rule("dispatch: fp8 scales float16", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch(_fp8(ctx, scales_dtype=torch.float16), **ctx.dispatch_kwargs())


@rule("dispatch: x a 3-tuple", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.dispatch((*_fp8(ctx), ctx.x), **ctx.dispatch_kwargs())


# dispatch: top-k
@rule("dispatch: topk_idx int32", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=ctx.topk_idx.to(torch.int32)))


@rule("dispatch: topk_idx not contiguous", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=_column_major(ctx.topk_idx)))


@rule("dispatch: topk_idx with the wrong row count", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=ctx.topk_idx[:-1].contiguous(),
                                                     topk_weights=ctx.topk_weights[:-1].contiguous()))


@rule("dispatch: expert id >= num_experts", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=_bad_topk(ctx, NUM_EXPERTS)))


@rule("dispatch: expert id < -1", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=_bad_topk(ctx, -5)))


@rule("dispatch: top-k > 32", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    idx = (torch.arange(33, dtype=torch.int64) % NUM_EXPERTS).repeat(NUM_TOKENS, 1)
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=idx, topk_weights=torch.ones(NUM_TOKENS, 33)))


@rule("dispatch: topk_idx without topk_weights", VALUE_OR_TYPE, "topk_weights")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_weights=None))


@rule("dispatch: topk_weights without topk_idx", VALUE_OR_TYPE, "topk_idx")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=None))


@rule("dispatch: topk_weights float64", VALUE_OR_TYPE, "topk_weights")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_weights=ctx.topk_weights.double()))


@rule("dispatch: topk_weights shape differs from topk_idx", VALUE_OR_TYPE, "topk_weights")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_weights=ctx.topk_weights[:, :1].contiguous()))


# dispatch: layout inputs
@rule("dispatch: num_tokens_per_rank missing", VALUE_OR_TYPE, "num_tokens_per_rank")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(num_tokens_per_rank=None))


@rule("dispatch: is_token_in_rank missing", VALUE_OR_TYPE, "is_token_in_rank")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(is_token_in_rank=None))


@rule("dispatch: num_tokens_per_expert missing", VALUE_OR_TYPE, "num_tokens_per_expert")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(num_tokens_per_expert=None))


@rule("dispatch: is_token_in_rank int32", VALUE_OR_TYPE, "is_token_in_rank")
def _(ctx):
    in_rank = ctx.layout["buffer"]["is_token_in_rank"].to(torch.int32)
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(is_token_in_rank=in_rank))


@rule("dispatch: is_token_in_rank with the wrong row count", VALUE_OR_TYPE, "is_token_in_rank")
def _(ctx):
    in_rank = ctx.layout["buffer"]["is_token_in_rank"][:-1].contiguous()
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(is_token_in_rank=in_rank))


@rule("dispatch: num_tokens_per_rank with the wrong length", VALUE_OR_TYPE, "num_tokens_per_rank")
def _(ctx):
    per_rank = ctx.layout["buffer"]["num_tokens_per_rank"][:-1].contiguous()
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(num_tokens_per_rank=per_rank))


@rule("dispatch: num_tokens_per_expert not a multiple of num_ranks", VALUE_OR_TYPE, "num_tokens_per_expert|num_experts")
def _(ctx):
    per_expert = ctx.layout["buffer"]["num_tokens_per_expert"][:-1].contiguous()
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(num_tokens_per_expert=per_expert, topk_idx=None,
                                                     topk_weights=None))


# dispatch: options
@rule("dispatch: expert_alignment 0", VALUE_OR_TYPE, "expert_alignment")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(expert_alignment=0))


@rule("dispatch: num_worst_tokens negative", VALUE_OR_TYPE, "num_worst_tokens")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(num_worst_tokens=-1))


@rule("dispatch: num_worst_tokens without topk_idx", VALUE_OR_TYPE, "num_worst_tokens")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(topk_idx=None, topk_weights=None,
                                                     num_worst_tokens=NUM_TOKENS * NUM_RANKS))


@rule("dispatch: allocate_on_comm_stream without previous_event", VALUE_OR_TYPE, "allocate_on_comm_stream")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(async_finish=True, allocate_on_comm_stream=True))


@rule("dispatch: allocate_on_comm_stream without async_finish", VALUE_OR_TYPE, "allocate_on_comm_stream")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(previous_event=ctx.buffer.capture(),
                                                     allocate_on_comm_stream=True))


@rule("dispatch: previous_event not an EventOverlap", VALUE_OR_TYPE, "previous_event")
def _(ctx):
    from deep_ep.utils import EventHandle
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(previous_event=EventHandle()))


@rule("dispatch: config not a Config", VALUE_OR_TYPE, "config")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, **ctx.dispatch_kwargs(config=(20, 6, 256, 6, 128)))


# dispatch: handle
@rule("dispatch: handle together with topk_idx", VALUE_OR_TYPE, "handle")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, handle=ctx.handle, topk_idx=ctx.topk_idx, topk_weights=ctx.topk_weights)


@rule("dispatch: handle of the wrong length", VALUE_OR_TYPE, "handle")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, handle=ctx.handle[:5])


@rule("dispatch: handle from a buffer of another group size", VALUE_OR_TYPE, "handle")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, handle=ctx.handle_pair)


@rule("dispatch: multi-node handle on a one-node buffer", VALUE_OR_TYPE, "handle")
def _(ctx):
    ctx.buffer.dispatch(ctx.x, handle=ctx.handle_nodes)


@rule("dispatch: one-node handle on a multi-node buffer", VALUE_OR_TYPE, "handle", buffer="buffer_nodes")
def _(ctx):
    ctx.buffer_nodes.dispatch(ctx.x, handle=ctx.handle)


@rule("dispatch: handle made for another token count", VALUE_OR_TYPE, "handle")
def _(ctx):
    ctx.buffer.dispatch(torch.cat([ctx.x, ctx.x[:1]]), handle=ctx.handle)


@rule("dispatch: multi-node handle made for another token count", VALUE_OR_TYPE, "handle", buffer="buffer_nodes")
def _(ctx):
    ctx.buffer_nodes.dispatch(ctx.x[:-1].contiguous(), handle=ctx.handle_nodes)


# combine
def _recv_rows(ctx) -> int:
    return ctx.handle[3].size(0)


@rule("combine: x with the wrong row count", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.combine(torch.zeros(_recv_rows(ctx) + 1, HIDDEN, dtype=torch.bfloat16), ctx.handle)


@rule("combine: x float32", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.combine(torch.zeros(_recv_rows(ctx), HIDDEN), ctx.handle)


@rule("combine: x not contiguous", VALUE_OR_TYPE, "`x`")
def _(ctx):
    ctx.buffer.combine(_column_major(torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)), ctx.handle)


@rule("combine: bias with the wrong shape", VALUE_OR_TYPE, "bias")
def _(ctx):
    y = torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)
    ctx.buffer.combine(y, ctx.handle, bias=torch.zeros(NUM_TOKENS + 1, HIDDEN, dtype=torch.bfloat16))


@rule("combine: second bias with the wrong shape", VALUE_OR_TYPE, "bias")
def _(ctx):
    y = torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)
    good = torch.zeros(NUM_TOKENS, HIDDEN, dtype=torch.bfloat16)
    ctx.buffer.combine(y, ctx.handle, bias=(good, torch.zeros(NUM_TOKENS, HIDDEN - 8, dtype=torch.bfloat16)))


@rule("combine: bias float32", VALUE_OR_TYPE, "bias")
def _(ctx):
    y = torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)
    ctx.buffer.combine(y, ctx.handle, bias=torch.zeros(NUM_TOKENS, HIDDEN))


@rule("combine: topk_weights with the wrong row count", VALUE_OR_TYPE, "topk_weights")
def _(ctx):
    y = torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)
    ctx.buffer.combine(y, ctx.handle, topk_weights=torch.zeros(_recv_rows(ctx) + 1, NUM_TOPK))


@rule("combine: handle of the wrong length", VALUE_OR_TYPE, "handle")
def _(ctx):
    ctx.buffer.combine(torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16), ctx.handle[:4])


@rule("combine: handle from a buffer of another group size", VALUE_OR_TYPE, "handle")
def _(ctx):
    rows = ctx.handle_pair[3].size(0)
    ctx.buffer.combine(torch.zeros(rows, HIDDEN, dtype=torch.bfloat16), ctx.handle_pair)


@rule("combine: allocate_on_comm_stream without async_finish", VALUE_OR_TYPE, "allocate_on_comm_stream")
def _(ctx):
    y = torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)
    ctx.buffer.combine(y, ctx.handle, previous_event=ctx.buffer.capture(), allocate_on_comm_stream=True)


@rule("combine: previous_event not an EventOverlap", VALUE_OR_TYPE, "previous_event")
def _(ctx):
    y = torch.zeros(_recv_rows(ctx), HIDDEN, dtype=torch.bfloat16)
    ctx.buffer.combine(y, ctx.handle, previous_event=object())


# num_worst_tokens overflow: only rank 0 receives too much, yet every rank raises
@rule("dispatch: a rank receives more than num_worst_tokens", (RuntimeError,), "num_worst_tokens")
def _(ctx):
    idx = torch.zeros(NUM_TOKENS, 1, dtype=torch.int64)  # everything to expert 0 on rank 0
    idx[:, 0] = torch.where(torch.arange(NUM_TOKENS) % 4 == 0, 0, -1)
    weights = torch.ones(NUM_TOKENS, 1)
    lay = ctx.buffer.get_dispatch_layout(idx, NUM_EXPERTS)
    received_by_rank0 = (NUM_TOKENS // 4) * NUM_RANKS
    ctx.buffer.dispatch(ctx.x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                        topk_idx=idx, topk_weights=weights, num_worst_tokens=received_by_rank0 - 1)


# static methods, Config and construction
@rule("Buffer.set_num_sms(odd)", VALUE_OR_TYPE, "new_num_sms", buffer=None)
def _(ctx):
    ctx.deep_ep.Buffer.set_num_sms(19)


@rule("Config: nvl send >= nvl recv", VALUE_OR_TYPE, "num_max_nvl_chunked_send_tokens", buffer=None)
def _(ctx):
    ctx.deep_ep.Config(20, 256, 256)


@rule("Config: rdma send >= rdma recv", VALUE_OR_TYPE, "num_max_rdma_chunked_send_tokens", buffer=None)
def _(ctx):
    ctx.deep_ep.Config(20, 6, 256, 64, 32)


@rule("Config: odd num_sms", VALUE_OR_TYPE, "num_sms", buffer=None)
def _(ctx):
    ctx.deep_ep.Config(num_sms=7)


@rule("Buffer(None) without comm", VALUE_OR_TYPE, "group", buffer=None)
def _(ctx):
    ctx.deep_ep.Buffer(None, num_nvl_bytes=NVL_BYTES)


@rule("Buffer: num_nvl_bytes negative", VALUE_OR_TYPE, "num_nvl_bytes", buffer=None)
def _(ctx):
    ctx.deep_ep.Buffer(ctx.group, num_nvl_bytes=-128)


@rule("Buffer: num_nvl_bytes not a multiple of 128", VALUE_OR_TYPE, "num_nvl_bytes", buffer=None)
def _(ctx):
    ctx.deep_ep.Buffer(ctx.group, num_nvl_bytes=1000)


@rule("Buffer: num_rdma_bytes not a multiple of 128", VALUE_OR_TYPE, "num_rdma_bytes", buffer=None)
def _(ctx):
    ctx.deep_ep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES, num_rdma_bytes=100)


# --------------------------------------------------------------------------------------- running

def _outcome(rule_def: Rule, ctx: Context) -> Optional[str]:
    """None if the call raised an accepted error whose message matches; else what went wrong."""
    try:
        rule_def.call(ctx)
    except rule_def.errors as exc:
        if not re.search(rule_def.match, str(exc)):
            return f"{type(exc).__name__} does not name {rule_def.match!r}: {exc}"
        return None
    except Exception as exc:  # noqa: BLE001
        accepted = "/".join(e.__name__ for e in rule_def.errors)
        return f"expected {accepted}, got {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return "no error was raised"


def validation_worker(rank: int, num_ranks: int, group, seed: int, names: List[str]) -> Dict[str, List[str]]:
    import torch.distributed as dist
    import deep_ep
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ctx = Context(rank, group, pair_groups[rank // 2], seed)
    saved_num_sms = deep_ep.Buffer.num_sms
    results = {}
    for name in names:
        rule_def = RULES[name]
        problems = []
        outcome = _outcome(rule_def, ctx)
        if outcome is not None:
            problems.append(f"[rank {rank}] {outcome}")
        deep_ep.Buffer.num_sms = saved_num_sms
        if rule_def.buffer is not None:
            broken = ctx.check_still_works(rule_def.buffer)
            if broken is not None:
                problems.append(f"[rank {rank}] {broken}")
        results[name] = problems
    return results


RULE_NAMES = list(RULES)


@pytest.fixture(scope="module")
def validation_results():
    seed = make_seed()
    per_rank = run_ranks(validation_worker, NUM_RANKS, seed, RULE_NAMES, timeout_s=300)
    return {name: [line for results in per_rank for line in results[name]] for name in RULE_NAMES}


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_rule(validation_results, rule_name):
    problems = validation_results[rule_name]
    assert not problems, "\n".join(problems)
