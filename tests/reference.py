"""Global-view reference for deep_ep's normal mode (layout, dispatch, combine).

Given every rank's inputs (Python lists indexed by rank), these functions compute what every rank
must receive, field by field, following ``docs/semantics.md``. They are a test oracle: written for
obviousness (loops over ranks, channels and tokens), single-process, pure torch, and independent of
``deep_ep`` (nothing is imported from it).

Conventions used throughout:

* ``R`` ranks; ``P`` ranks per node (``ranks_per_node``; ``None`` means one node holding every rank);
  rank ``d`` lives on node ``d // P`` with local index ``d % P``. More than one node means the
  10-field multi-node handle and the hierarchical combine sum.
* ``C`` channels; a rank with ``T`` tokens gives channel ``c`` the tokens
  ``[min(c*per, T), min((c+1)*per, T))`` with ``per = ceil(T / C)``.
* Expert ``e`` lives on rank ``e // E_loc`` (``E_loc = num_experts // R``), local id ``e % E_loc``.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "Topology", "WorstTokensOverflow", "channel_ranges", "token_channels", "layout", "layout_all",
    "dispatch", "combine",
]

TensorOrPair = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class WorstTokensOverflow(Exception):
    """Some rank would receive more tokens than ``num_worst_tokens`` (every rank must raise)."""


@dataclass(frozen=True)
class Topology:
    """``num_ranks`` ranks split into nodes of ``ranks_per_node`` consecutive ranks."""
    num_ranks: int
    ranks_per_node: Optional[int] = None

    @property
    def P(self) -> int:
        return self.num_ranks if self.ranks_per_node is None else self.ranks_per_node

    @property
    def num_nodes(self) -> int:
        assert self.num_ranks % self.P == 0, "ranks_per_node must divide num_ranks"
        return self.num_ranks // self.P

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.P

    def local_of(self, rank: int) -> int:
        return rank % self.P

    def ranks_of_node(self, node: int) -> range:
        return range(node * self.P, (node + 1) * self.P)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def channel_ranges(num_tokens: int, num_channels: int) -> List[Tuple[int, int]]:
    """``[(begin, end)]`` of each channel's contiguous token range."""
    per = _ceil_div(num_tokens, num_channels)
    return [(min(c * per, num_tokens), min((c + 1) * per, num_tokens)) for c in range(num_channels)]


def token_channels(num_tokens: int, num_channels: int) -> List[int]:
    """The channel of every token."""
    channel_of = [0] * num_tokens
    for c, (begin, end) in enumerate(channel_ranges(num_tokens, num_channels)):
        for t in range(begin, end):
            channel_of[t] = c
    return channel_of


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------

def layout(topk_idx: torch.Tensor, num_experts: int, topo: Topology) -> dict:
    """What ``get_dispatch_layout`` returns on one rank (no communication involved).

    Returns a dict with ``num_tokens_per_rank`` (int32 ``[R]``), ``num_tokens_per_rdma_rank``
    (int32 ``[N_nodes]``, or ``None`` on one node), ``num_tokens_per_expert`` (int32 ``[E]``) and
    ``is_token_in_rank`` (bool ``[T, R]``).
    """
    R = topo.num_ranks
    experts_per_rank = num_experts // R
    rows = topk_idx.tolist()
    num_tokens = len(rows)

    per_expert = [0] * num_experts
    in_rank = [[False] * R for _ in range(num_tokens)]
    for t, row in enumerate(rows):
        for expert in row:
            if expert < 0:
                continue
            per_expert[expert] += 1  # duplicates count twice
            in_rank[t][expert // experts_per_rank] = True

    per_rank = [sum(in_rank[t][d] for t in range(num_tokens)) for d in range(R)]
    per_node = None
    if topo.multi_node:
        per_node = [sum(any(in_rank[t][d] for d in topo.ranks_of_node(b)) for t in range(num_tokens))
                    for b in range(topo.num_nodes)]

    return {
        "num_tokens_per_rank": torch.tensor(per_rank, dtype=torch.int32),
        "num_tokens_per_rdma_rank": None if per_node is None else torch.tensor(per_node, dtype=torch.int32),
        "num_tokens_per_expert": torch.tensor(per_expert, dtype=torch.int32),
        "is_token_in_rank": torch.tensor(in_rank, dtype=torch.bool).reshape(num_tokens, R),
    }


def layout_all(topk_idx: Sequence[torch.Tensor], num_experts: int, topo: Topology) -> List[dict]:
    """``layout`` for every rank."""
    return [layout(idx, num_experts, topo) for idx in topk_idx]


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

@dataclass
class _Routing:
    """Who sends what where, derived from every rank's ``is_token_in_rank``."""
    topo: Topology
    num_channels: int
    in_rank: List[List[List[bool]]]          # [s][t][d]
    channel_of: List[List[int]]              # [s][t]
    sent_tokens: List[List[List[int]]] = field(default_factory=list)  # [s][d] -> source token ids, ascending

    def __post_init__(self):
        R = self.topo.num_ranks
        self.sent_tokens = [[[t for t, row in enumerate(self.in_rank[s]) if row[d]] for d in range(R)]
                            for s in range(R)]
        self._node_targets = {}

    def count(self, s: int, d: int) -> int:
        return len(self.sent_tokens[s][d])

    def num_tokens(self, s: int) -> int:
        return len(self.in_rank[s])

    def needs_node(self, s: int, t: int, b: int) -> bool:
        return any(self.in_rank[s][t][d] for d in self.topo.ranks_of_node(b))

    def received(self, r: int) -> List[Tuple[int, int]]:
        """``(source rank, source token)`` of every row rank ``r`` receives, in ``recv_x`` order."""
        return [(s, t) for s in range(self.topo.num_ranks) for t in self.sent_tokens[s][r]]


def _make_routing(is_token_in_rank: Sequence[torch.Tensor], topo: Topology, num_channels: int) -> _Routing:
    in_rank = [m.tolist() for m in is_token_in_rank]
    channel_of = [token_channels(len(rows), num_channels) for rows in in_rank]
    return _Routing(topo, num_channels, in_rank, channel_of)


def _inclusive_channel_prefix(tokens_per_channel: List[int]) -> List[int]:
    out, total = [], 0
    for n in tokens_per_channel:
        total += n
        out.append(total)
    return out


def _sender_channel_prefix(rt: _Routing, s: int, targets: Sequence[Sequence[bool]]) -> List[List[int]]:
    """``[target, c]`` = tokens of channels ``0..c`` of rank ``s`` with ``targets[t][target]``."""
    num_targets = len(targets[0]) if targets else 0
    out = []
    for target in range(num_targets if targets else 0):
        per_channel = [0] * rt.num_channels
        for t, row in enumerate(targets):
            if row[target]:
                per_channel[rt.channel_of[s][t]] += 1
        out.append(_inclusive_channel_prefix(per_channel))
    return out


def _node_targets(rt: _Routing, s: int) -> List[List[bool]]:
    """``[t][b]`` = token ``t`` of rank ``s`` needs node ``b`` (cached per source)."""
    if s not in rt._node_targets:
        rt._node_targets[s] = [[rt.needs_node(s, t, b) for b in range(rt.topo.num_nodes)]
                               for t in range(rt.num_tokens(s))]
    return rt._node_targets[s]


def _channel_prefix_rows(rt: _Routing, s: int, num_targets: int, targets: List[List[bool]]) -> List[List[int]]:
    if rt.num_tokens(s) == 0:
        return [[0] * rt.num_channels for _ in range(num_targets)]
    return _sender_channel_prefix(rt, s, targets)


def _ring_slots(rt: _Routing, s: int, targets: List[List[bool]], num_targets: int) -> List[List[int]]:
    """``[t][target]`` = earlier tokens of the same channel going to ``target``; -1 if not sent."""
    slots = [[-1] * num_targets for _ in range(rt.num_tokens(s))]
    for target in range(num_targets):
        used = [0] * rt.num_channels
        for t in range(rt.num_tokens(s)):
            if targets[t][target]:
                c = rt.channel_of[s][t]
                slots[t][target] = used[c]
                used[c] += 1
    return slots


def _int32(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).reshape(shape)


def _handle_one_node(rt: _Routing, r: int, recv: List[Tuple[int, int]], recv_rows: int,
                     is_token_in_rank: torch.Tensor, num_worst_tokens: int = 0) -> tuple:
    R, C = rt.topo.num_ranks, rt.num_channels

    rank_prefix = [[0] * R for _ in range(R)]
    for j in range(R):
        total = 0
        for i in range(R):
            total += rt.count(i, j)
            rank_prefix[i][j] = total

    channel_prefix = _channel_prefix_rows(rt, r, R, rt.in_rank[r])

    recv_channel_prefix = []
    for s in range(R):
        sender_rows = _channel_prefix_rows(rt, s, R, rt.in_rank[s])[r]
        recv_channel_prefix.append([0] + sender_rows[:-1])  # exclusive prefix over channels

    src_idx = [t for _, t in recv] + [-1] * (recv_rows - len(recv))
    send_head = _ring_slots(rt, r, rt.in_rank[r], R)

    return (
        _int32(rank_prefix, (R, R)),
        _int32(channel_prefix, (R, C)),
        _int32(recv_channel_prefix, (R, C)),
        _int32(src_idx, (recv_rows,)),
        is_token_in_rank,
        _int32(send_head, (rt.num_tokens(r), R)),
    )


def _handle_multi_node(rt: _Routing, r: int, recv: List[Tuple[int, int]], recv_rows: int,
                       is_token_in_rank: torch.Tensor, num_worst_tokens: int = 0) -> tuple:
    topo = rt.topo
    R, C, P, num_nodes = topo.num_ranks, rt.num_channels, topo.P, topo.num_nodes
    my_node, my_local = topo.node_of(r), topo.local_of(r)

    node_targets = [_node_targets(rt, s) for s in range(R)]
    rdma_channel_prefix_all = [_channel_prefix_rows(rt, s, num_nodes, node_targets[s]) for s in range(R)]
    gbl_channel_prefix_all = [_channel_prefix_rows(rt, s, R, rt.in_rank[s]) for s in range(R)]

    # 1, 2: sender side.
    rdma_channel_prefix = rdma_channel_prefix_all[r]
    gbl_channel_prefix = gbl_channel_prefix_all[r]

    # 3, 4: forwarder side; the forwarder of my node for rank (a, my_local) is me.
    forward_sources = [a * P + my_local for a in range(num_nodes)]
    recv_rdma_channel_prefix = [rdma_channel_prefix_all[s][my_node] for s in forward_sources]
    recv_rdma_rank_prefix, total = [], 0
    for s in forward_sources:
        total += sum(node_targets[s][t][my_node] for t in range(rt.num_tokens(s)))
        recv_rdma_rank_prefix.append(total)

    # 5, 6: receiver side.
    recv_gbl_rank_prefix, total = [], 0
    segment_start = []
    for s in range(R):
        segment_start.append(total)
        total += rt.count(s, r)
        recv_gbl_rank_prefix.append(total)
    recv_gbl_channel_prefix = []
    for s in range(R):
        exclusive = [0] + gbl_channel_prefix_all[s][r][:-1]
        recv_gbl_channel_prefix.append([segment_start[s] + v for v in exclusive])

    # 7: per received token, (source node, bitmask of the ranks of my node that receive it).
    meta = []
    for s, t in recv:
        mask = 0
        for j, d in enumerate(topo.ranks_of_node(my_node)):
            if rt.in_rank[s][t][d]:
                mask |= 1 << j
        meta.append([topo.node_of(s), mask])
    meta += [[0, 0]] * (recv_rows - len(recv))
    recv_src_meta = torch.tensor(meta, dtype=torch.int32).reshape(recv_rows, 2).view(torch.uint8).reshape(recv_rows, 8)

    # 8: sender's ring slots towards each node.
    send_rdma_head = _ring_slots(rt, r, node_targets[r], num_nodes)

    # 9: forwarder's ring slots towards each local rank of my node. Rows in (source node, source
    # token) order; the ring of (channel c, local rank j) is shared by every source node.
    forwarded = [(s, t) for s in forward_sources for t in range(rt.num_tokens(s)) if node_targets[s][t][my_node]]
    used = [[0] * P for _ in range(C)]
    send_nvl_head = []
    for s, t in forwarded:
        c = rt.channel_of[s][t]
        row = []
        for j, d in enumerate(topo.ranks_of_node(my_node)):
            if rt.in_rank[s][t][d]:
                row.append(used[c][j])
                used[c][j] += 1
            else:
                row.append(-1)
        send_nvl_head.append(row)
    nvl_rows = len(forwarded)
    if num_worst_tokens > 0:  # P * W rows, -1 past the forwarded ones (docs/semantics.md)
        nvl_rows = P * num_worst_tokens
        send_nvl_head += [[-1] * P for _ in range(nvl_rows - len(forwarded))]

    return (
        is_token_in_rank,
        _int32(rdma_channel_prefix, (num_nodes, C)),
        _int32(gbl_channel_prefix, (R, C)),
        _int32(recv_rdma_channel_prefix, (num_nodes, C)),
        _int32(recv_rdma_rank_prefix, (num_nodes,)),
        _int32(recv_gbl_channel_prefix, (R, C)),
        _int32(recv_gbl_rank_prefix, (R,)),
        recv_src_meta,
        _int32(send_rdma_head, (rt.num_tokens(r), num_nodes)),
        _int32(send_nvl_head, (nvl_rows, P)),
    )


def _gather_rows(parts: List[Tuple[torch.Tensor, List[int]]], recv_rows: int, like: torch.Tensor,
                 fill) -> torch.Tensor:
    """Stack ``tensor[rows]`` of every (tensor, rows) part, padded with `fill` up to ``recv_rows`` rows."""
    pieces = [tensor[torch.tensor(rows, dtype=torch.long)] for tensor, rows in parts if rows]
    tail_shape = tuple(like.shape[1:])
    out = torch.cat(pieces, dim=0) if pieces else torch.empty((0,) + tail_shape, dtype=like.dtype)
    if recv_rows > out.shape[0]:
        pad = torch.empty((recv_rows - out.shape[0],) + tail_shape, dtype=like.dtype)
        if like.dtype == torch.float8_e4m3fn:
            pad.view(torch.uint8).fill_(0)
        else:
            pad.fill_(fill)
        out = torch.cat([out, pad], dim=0)
    return out.contiguous()


def dispatch(x: Sequence[TensorOrPair], is_token_in_rank: Sequence[torch.Tensor],
             num_tokens_per_expert: Sequence[torch.Tensor], num_experts: int, num_channels: int,
             topo: Topology, topk_idx: Optional[Sequence[torch.Tensor]] = None,
             topk_weights: Optional[Sequence[torch.Tensor]] = None, expert_alignment: int = 1,
             num_worst_tokens: int = 0, ranks: Optional[Sequence[int]] = None) -> List[Optional[dict]]:
    """What every rank receives from a (non-cached) normal dispatch.

    Args:
        x: per rank, ``[T_s, H]`` tensor or ``(x_fp8 [T_s, H], scales [T_s, H/128])``.
        is_token_in_rank: per rank, bool ``[T_s, R]`` (the routing).
        num_tokens_per_expert: per rank, int ``[E]`` (only feeds the per-expert count list).
        num_experts: ``E``.
        num_channels: ``C = config.num_sms // 2``.
        topo: ranks and nodes.
        topk_idx, topk_weights: per rank ``[T_s, K]`` (int64 / float32), or ``None`` for both.
        expert_alignment: the count list is rounded up to a multiple of it.
        num_worst_tokens: ``W > 0`` pads every output to ``W`` rows.
        ranks: compute only these receivers (the others are ``None`` in the result); default all.

    Returns:
        per rank, a dict with ``recv_x`` (tensor or pair), ``recv_topk_idx``, ``recv_topk_weights``
        (``None`` without top-k), ``num_recv_tokens_per_expert_list`` (list of int), ``handle``
        (6- or 10-tuple), ``num_recv_tokens`` (the valid row count) and ``recv_sources``
        (``[(source rank, source token)]``).

    Raises:
        WorstTokensOverflow: a rank would receive more than ``num_worst_tokens`` rows.
    """
    R = topo.num_ranks
    experts_per_rank = num_experts // R
    rt = _make_routing(is_token_in_rank, topo, num_channels)

    if num_worst_tokens > 0:
        too_many = [r for r in range(R) if len(rt.received(r)) > num_worst_tokens]
        if too_many:
            raise WorstTokensOverflow(f"ranks {too_many} receive more than num_worst_tokens={num_worst_tokens}")

    wanted = set(range(R) if ranks is None else ranks)
    outputs = []
    for r in range(R):
        if r not in wanted:
            outputs.append(None)
            continue
        recv = rt.received(r)
        recv_rows = num_worst_tokens if num_worst_tokens > 0 else len(recv)
        parts_per_source = [[] for _ in range(R)]
        for s, t in recv:
            parts_per_source[s].append(t)

        def gather(per_rank_tensors, fill):
            parts = [(per_rank_tensors[s], parts_per_source[s]) for s in range(R)]
            return _gather_rows(parts, recv_rows, per_rank_tensors[0], fill)

        if isinstance(x[0], (tuple, list)):
            recv_x = (gather([pair[0] for pair in x], 0), gather([pair[1] for pair in x], 0))
        else:
            recv_x = gather(list(x), 0)

        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            idx_rows = gather(list(topk_idx), -1).tolist()
            weight_rows = gather(list(topk_weights), 0).tolist()
            local_idx, local_weights = [], []
            for i, (idx_row, weight_row) in enumerate(zip(idx_rows, weight_rows)):
                valid = i < len(recv)
                out_idx, out_w = [], []
                for expert, weight in zip(idx_row, weight_row):
                    mine = valid and expert >= 0 and expert // experts_per_rank == r
                    out_idx.append(expert - r * experts_per_rank if mine else -1)
                    out_w.append(weight if mine else 0.0)
                local_idx.append(out_idx)
                local_weights.append(out_w)
            num_topk = topk_idx[0].shape[1]
            recv_topk_idx = torch.tensor(local_idx, dtype=torch.int64).reshape(recv_rows, num_topk)
            recv_topk_weights = torch.tensor(local_weights, dtype=torch.float32).reshape(recv_rows, num_topk)

        if num_worst_tokens > 0:
            count_list = []
        else:
            count_list = []
            for j in range(experts_per_rank):
                total = sum(int(num_tokens_per_expert[s][r * experts_per_rank + j]) for s in range(R))
                count_list.append(_ceil_div(total, expert_alignment) * expert_alignment)

        make_handle = _handle_multi_node if topo.multi_node else _handle_one_node
        handle = make_handle(rt, r, recv, recv_rows, is_token_in_rank[r], num_worst_tokens)
        outputs.append({
            "recv_x": recv_x,
            "recv_topk_idx": recv_topk_idx,
            "recv_topk_weights": recv_topk_weights,
            "num_recv_tokens_per_expert_list": count_list,
            "handle": handle,
            "num_recv_tokens": len(recv),
            "recv_sources": recv,
        })
    return outputs


# --------------------------------------------------------------------------------------------------
# Combine
# --------------------------------------------------------------------------------------------------

def _bias_terms(bias) -> List[torch.Tensor]:
    if bias is None:
        return []
    if isinstance(bias, (tuple, list)):
        return [b for b in bias if b is not None]
    return [bias]


def combine(x: Sequence[torch.Tensor], is_token_in_rank: Sequence[torch.Tensor], topo: Topology,
            topk_weights: Optional[Sequence[torch.Tensor]] = None,
            bias: Optional[Sequence] = None,
            ranks: Optional[Sequence[int]] = None) -> List[Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]]:
    """What every rank gets back from a normal combine.

    Args:
        x: per rank ``d``, bf16 ``[N_d (or W), H]`` rows in ``d``'s ``recv_x`` order.
        is_token_in_rank: per rank, the routing of the dispatch that produced the handle.
        topo: ranks and nodes (several nodes: hierarchical sum).
        topk_weights: per rank ``[N_d, K]`` float32, or ``None``.
        bias: per rank ``None``, a bf16 ``[T, H]`` tensor, or a pair of them (``None`` = no bias anywhere).
        ranks: compute only these ranks' results (the others are ``None``); default all.

    Returns:
        per rank ``(combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None)``.

    One node: ``bf16(fp32(b0) + fp32(b1) + sum_d fp32(x_d))``, one fp32 accumulator, ranks ascending.
    Several nodes: ``p_b = bf16(sum over the ranks of node b, ascending, fp32)``, then
    ``bf16(fp32(b0) + fp32(b1) + sum_b fp32(p_b))`` over nodes ascending. Weights: the plain fp32 sum of
    the received rows over ranks ascending (no rounding, not grouped by node, whatever the node count).
    """
    R = topo.num_ranks
    rt = _make_routing(is_token_in_rank, topo, 1)
    hidden = x[0].shape[1]
    # Row of (source s, token t) inside rank d's recv_x: start of s's segment + position among s's tokens.
    segment_start = [[sum(rt.count(i, d) for i in range(s)) for d in range(R)] for s in range(R)]

    wanted = set(range(R) if ranks is None else ranks)
    results = []
    for s in range(R):
        if s not in wanted:
            results.append(None)
            continue
        num_tokens = rt.num_tokens(s)
        biases = _bias_terms(None if bias is None else bias[s])
        acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
        for b in biases:
            acc += b.float()
        num_topk = topk_weights[0].shape[1] if topk_weights is not None else 0
        wacc = torch.zeros(num_tokens, num_topk, dtype=torch.float32) if topk_weights is not None else None

        def contributions(d):
            tokens = rt.sent_tokens[s][d]
            rows = list(range(segment_start[s][d], segment_start[s][d] + len(tokens)))
            return torch.tensor(tokens, dtype=torch.long), torch.tensor(rows, dtype=torch.long)

        node_groups = [list(topo.ranks_of_node(b)) for b in range(topo.num_nodes)]
        if not topo.multi_node:
            for d in range(R):
                tokens, rows = contributions(d)
                if len(tokens) == 0:
                    continue
                acc[tokens] += x[d][rows].float()  # tokens are unique: one fp32 add per element
        else:
            for ranks in node_groups:
                partial = torch.zeros(num_tokens, hidden, dtype=torch.float32)
                reached = torch.zeros(num_tokens, dtype=torch.bool)
                for d in ranks:
                    tokens, rows = contributions(d)
                    if len(tokens) == 0:
                        continue
                    partial[tokens] += x[d][rows].float()
                    reached[tokens] = True
                # Only tokens that reached this node get a (rounded) partial sum added.
                acc[reached] += partial[reached].to(torch.bfloat16).float()
        if wacc is not None:
            for d in range(R):
                tokens, rows = contributions(d)
                if len(tokens):
                    wacc[tokens] += topk_weights[d][rows]
        results.append((acc.to(torch.bfloat16), wacc))
    return results
