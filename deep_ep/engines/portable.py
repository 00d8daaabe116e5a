"""The portable engine, normal (high-throughput) mode: dispatch and combine on torch.distributed.

It implements `docs/semantics.md` exactly with vectorised torch ops and a fixed, small number of
collectives per call (never one per peer or per token):

* dispatch: one exchange of per-rank counts (every rank sends its counts to every rank, so each knows
  the whole traffic matrix, computes every handle field and rejects a `num_worst_tokens` overflow on
  all ranks alike; it overlaps with packing the rows), then the
  token rows go by one all-to-all straight into ``recv_x`` while their metadata (scales, top-k,
  source index: one row table gathered once) travels in a second, small all-to-all. Writing the rows
  in place saves a full copy of the received data, which costs more than one extra small collective;
* cached dispatch: the counts come from the handle, so only the rows (and FP8 scales) move;
* combine: the rows are already ordered by source rank, so ``x`` itself is sent (no packing), after
  one all-to-all for the top-k weights when given; the reduce is token-blocked (`reduce_rows_by_token`).

The collectives go through the `Communicator`: on one host its shared-memory transport
(`deep_ep._shm`), where the dispatch gathers its rows straight into the shared send area
(`Communicator.send_buffer`) and the combine reduces the rows where they arrived
(`Communicator.all_to_all_views`); elsewhere gloo.

Arguments arrive validated by `deep_ep.Buffer`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _agree, _native
from .._comm import Communicator

__all__ = ["PortableEngine"]

_I32 = torch.int32


def _channel_bounds(num_tokens: int, num_channels: int) -> int:
    """Tokens per channel (the last channels may be shorter or empty)."""
    return (num_tokens + num_channels - 1) // num_channels if num_tokens > 0 else 0


def _channel_counts(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """``mask`` bool ``[T, D]`` -> int32 ``[D, C]``: per destination, tokens of each channel in ``mask``."""
    num_tokens, num_dst = mask.shape
    if num_tokens == 0:
        return torch.zeros((num_dst, num_channels), dtype=_I32, device=mask.device)
    per = _channel_bounds(num_tokens, num_channels)
    lib = _native.library() if mask.device.type == "cpu" else None
    if lib is not None and mask.dtype == torch.bool:  # the same in one C loop (deep_ep._native)
        return _native.dispatch_channel_counts(lib, mask, per, num_channels)
    padded = torch.zeros((num_dst, per * num_channels), dtype=_I32, device=mask.device)
    padded[:, :num_tokens] = mask.t().to(_I32)
    return padded.view(num_dst, num_channels, per).sum(-1, dtype=_I32)


def _slots(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Ring slot of every (token, destination): earlier tokens of the same channel with the same
    destination, or -1 where ``mask`` is False. ``mask`` bool ``[T, D]`` -> int32 ``[T, D]``."""
    num_tokens, num_dst = mask.shape
    if num_tokens == 0:
        return torch.empty((0, num_dst), dtype=_I32, device=mask.device)
    per = _channel_bounds(num_tokens, num_channels)
    lib = _native.library() if mask.device.type == "cpu" else None
    if lib is not None and mask.dtype == torch.bool:  # the same in one C loop (deep_ep._native)
        return _native.dispatch_slots(lib, mask, per)
    m = mask.to(_I32)
    inclusive = torch.cumsum(m, dim=0, dtype=_I32)
    # Subtract the count before each token's channel start.
    starts = torch.arange(num_tokens, device=mask.device) // per * per
    before = torch.cat([torch.zeros((1, num_dst), dtype=_I32, device=mask.device), inclusive], dim=0)[starts]
    slot = inclusive - before - 1
    return torch.where(mask, slot, torch.full_like(slot, -1))


def _gather_rows(x_bytes: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = x_bytes[index[i]]`` (uint8 rows of contiguous CPU tensors), with the native helper's
    non-temporal stores when it is there (deep_ep._native): the rows are read next by a transport or a
    peer, not by this core."""
    lib = _native.library() if x_bytes.device.type == "cpu" else None
    if lib is not None and index.numel():
        _native.copy_rows(lib, x_bytes, index, [out], None, torch.arange(index.numel()))
    else:
        torch.index_select(x_bytes, 0, index, out=out)


# A destination's rows go as one iovec per run of consecutive tokens when the runs average at least
# this many bytes; shorter ones cost more per iovec than gathering them into one buffer. (Measured with
# the streams' Python loop at 8 ranks, hidden 2048 BF16, runs of about 3 rows: iovecs 0.60-0.62x the raw
# all-to-all, gathered 0.54-0.55x, so a 4 KiB row is worth its own iovec. The C loop makes an iovec
# cheaper still; the threshold is kept.)
_MIN_RUN_BYTES = 2048


def _row_runs(x_bytes: torch.Tensor, dst_ids: torch.Tensor, tok_ids: torch.Tensor, n_send: List[int], me: int,
              staging) -> Tuple[Optional[torch.Tensor], Dict[int, torch.Tensor]]:
    """The dispatch's rows for each other rank as byte ranges for `deep_ep._rowsock` (``sendmsg``): ranges
    of ``x`` itself, one per run of consecutive tokens, or for a destination whose runs are short one
    range of a buffer its rows are gathered into. ``dst_ids``/``tok_ids``: every (destination, token)
    pair, sorted by destination then token. Returns ``(the gathered buffer or None, {destination: int64
    [ranges, 3] rows (base, byte offset, bytes)})`` with base 0 for ``x_bytes``, 1 for the gathered
    buffer; destinations without rows (and this rank) are absent."""
    num = tok_ids.numel()
    out: Dict[int, torch.Tensor] = {}
    if num == 0:
        return None, out
    row_bytes = x_bytes.size(1)
    # A run starts where the destination changes or the token does not follow the previous one.
    lib = _native.library()
    if lib is not None:  # the same in one C loop (deep_ep._native)
        run_tok, run_len, runs_per_dst = _native.dispatch_row_runs(lib, dst_ids, tok_ids, len(n_send))
    else:
        starts = torch.ones(num, dtype=torch.bool)
        starts[1:] = (tok_ids[1:] != tok_ids[:-1] + 1) | (dst_ids[1:] != dst_ids[:-1])
        first = starts.nonzero().view(-1)
        runs_per_dst = torch.bincount(dst_ids.index_select(0, first), minlength=len(n_send)).tolist()
        bounds = torch.cat([first, torch.tensor([num])])
        run_tok = tok_ids.index_select(0, first)
        run_len = bounds[1:] - bounds[:-1]
    runs = torch.stack([torch.zeros_like(run_tok), run_tok * row_bytes, run_len * row_bytes], dim=1)
    short = [d for d in range(len(n_send))
             if d != me and n_send[d] and n_send[d] * row_bytes < _MIN_RUN_BYTES * runs_per_dst[d]]
    gathered = None
    if short:
        rows = sum(n_send[d] for d in short)
        gathered = staging(rows * row_bytes, x_bytes.device).view(rows, row_bytes)
    run_at, row_at, gat = 0, 0, 0
    for d in range(len(n_send)):
        n_runs = runs_per_dst[d]
        if d != me and n_send[d]:
            if d in short:
                _gather_rows(x_bytes, tok_ids[row_at:row_at + n_send[d]], gathered[gat:gat + n_send[d]])
                out[d] = torch.tensor([[1, gat * row_bytes, n_send[d] * row_bytes]], dtype=torch.int64)
                gat += n_send[d]
            else:
                out[d] = runs[run_at:run_at + n_runs]
        run_at += n_runs
        row_at += n_send[d]
    return gathered, out


def _exclusive_cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cumsum(t, dim=dim, dtype=_I32) - t.to(_I32)


# Bytes of the fp32 accumulator block of the combine reduce: small enough to stay in cache while every
# source's rows for its tokens are added (the whole [T, H] fp32 accumulator does not).
_REDUCE_BLOCK_BYTES = 1 << 19


def reduce_rows_by_token(rows, tok_ids: torch.Tensor, bounds: Sequence[int], num_tokens: int,
                         bias: Sequence[torch.Tensor] = (), block_tokens: int = 0) -> torch.Tensor:
    """``out[t] = dtype(bias_0[t] + bias_1[t] + ... + rows[i_0] + rows[i_1] + ...)`` in float32.

    Segment ``d`` of `rows` (``rows[bounds[d]:bounds[d + 1]]``) holds rows for the tokens
    ``tok_ids[bounds[d]:bounds[d + 1]]`` (ascending, no repeats inside a segment); a token's rows are
    added segment by segment in ascending order, after the biases. The additions per token are those of
    ``acc = zeros; acc += bias.float() ...; acc.index_add_(0, tok_ids_d, rows_d.float()) for each d``,
    in the same order, so the result is bit-identical to it; the work goes one block of tokens at a
    time so that the float32 accumulator stays in cache and no full-size float32 copy of `rows` exists.
    `rows` may also be the list of the segments themselves (e.g. views into the senders' shared memory).
    """
    segs = list(rows) if isinstance(rows, (list, tuple)) else \
        [rows[bounds[d]:bounds[d + 1]] for d in range(len(bounds) - 1)]
    hidden = segs[0].size(1) if segs else 0
    dtype = segs[0].dtype if segs else torch.bfloat16
    device = tok_ids.device
    out = torch.empty((num_tokens, hidden), dtype=dtype, device=device)
    if num_tokens == 0:
        return out
    lib = _native.library() if device.type == "cpu" and not block_tokens else None
    if (lib is not None and hidden > 0 and dtype == torch.bfloat16
            and all(s.dtype == dtype and (s.numel() == 0 or s.stride(1) == 1) for s in segs)
            and all(b.dtype == dtype and b.stride(1) == 1 for b in bias)):
        _native.reduce_segments_bf16(lib, segs, tok_ids, bounds, num_tokens, bias, out)  # the same sums in C
        return out
    block = block_tokens or max(8, _REDUCE_BLOCK_BYTES // max(1, hidden * 4))
    edges = list(range(0, num_tokens, block)) + [num_tokens]
    edge_t = torch.tensor(edges, dtype=tok_ids.dtype, device=tok_ids.device)
    cuts = []
    for d in range(len(bounds) - 1):
        if bounds[d + 1] > bounds[d]:
            cuts.append((d, (torch.searchsorted(tok_ids[bounds[d]:bounds[d + 1]], edge_t) + bounds[d]).tolist()))
    acc_buf = torch.empty((min(block, num_tokens), hidden), dtype=torch.float32, device=device)
    conv_buf = torch.empty_like(acc_buf)
    for i in range(len(edges) - 1):
        t0, t1 = edges[i], edges[i + 1]
        acc = acc_buf[:t1 - t0]
        acc.zero_()
        for b in bias:
            acc += b[t0:t1].float()
        for d, cut in cuts:
            lo, hi = cut[i], cut[i + 1]
            if hi > lo:
                conv = conv_buf[:hi - lo]
                conv.copy_(segs[d][lo - bounds[d]:hi - bounds[d]])
                acc.index_add_(0, tok_ids[lo:hi] - t0, conv)
        out[t0:t1].copy_(acc)
    return out


class _Packer:
    """Lays out a flat uint8 all-to-all buffer: one segment per peer, each a sequence of parts."""

    def __init__(self, num_peers: int) -> None:
        self.parts: List[List[Tuple[str, int]]] = [[] for _ in range(num_peers)]

    def add(self, peer: int, name: str, num_bytes: int) -> None:
        self.parts[peer].append((name, int(num_bytes)))

    def layout(self) -> Tuple[List[int], dict]:
        sizes, offsets, pos = [], {}, 0
        for peer, parts in enumerate(self.parts):
            start = pos
            for name, nbytes in parts:
                offsets[(peer, name)] = (pos, nbytes)
                pos += nbytes
            sizes.append(pos - start)
        return sizes, offsets


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's data as uint8, row-major: ``[n, w]`` of any dtype -> ``[n, w * element_size]``."""
    if t.numel() == 0:
        # torch calls every empty tensor contiguous, so .contiguous() may keep a stride-0 last dim
        # (e.g. column-major scales of a rank without tokens) that .view(uint8) rejects.
        return torch.empty(tuple(t.shape[:-1]) + (t.shape[-1] * t.element_size(),), dtype=torch.uint8,
                           device=t.device)
    return t.contiguous().view(torch.uint8)


class PortableEngine:
    """Normal-mode dispatch/combine over a `Communicator`.

    Args:
        comm: the Buffer's communicator.
        num_ranks_per_node: ranks per node (``R`` when there is one node).
    """

    name = "portable"

    def __init__(self, comm: Communicator, num_ranks_per_node: int) -> None:
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.size
        self.num_ranks_per_node = num_ranks_per_node
        self.num_nodes = self.num_ranks // num_ranks_per_node
        self._stage = {}

    def _staging(self, num_bytes: int, device: torch.device) -> torch.Tensor:
        """A reused send buffer (fresh large allocations cost a page fault per 4 KiB on every call).
        Safe because every call finishes its collectives before it returns. With the shared-memory
        transport it is this rank's shared data area, so the all-to-all from it copies nothing more."""
        if device.type == "cpu":
            shared = self.comm.send_buffer(num_bytes)  # same-host shared memory: no copy at send time
            if shared is not None:
                return shared
        buf = self._stage.get(device)
        if buf is None or buf.numel() < num_bytes:
            buf = torch.empty(max(num_bytes, 1), dtype=torch.uint8, device=device)
            self._stage[device] = buf
        return buf[:num_bytes]

    # ------------------------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        num_tokens = topk_idx.size(0)
        device = topk_idx.device
        valid = topk_idx >= 0
        experts = topk_idx[valid]
        num_tokens_per_expert = torch.bincount(experts, minlength=num_experts).to(_I32)
        experts_per_rank = num_experts // self.num_ranks
        # Scatter rank hits into one extra column for -1 slots, then drop it.
        rank_of = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, self.num_ranks))
        hits = torch.zeros((num_tokens, self.num_ranks + 1), dtype=torch.bool, device=device)
        hits.scatter_(1, rank_of, True)
        is_token_in_rank = hits[:, : self.num_ranks].contiguous()
        num_tokens_per_rank = is_token_in_rank.sum(0, dtype=_I32)
        num_tokens_per_rdma_rank = None
        if self.num_nodes > 1:
            in_node = is_token_in_rank.view(num_tokens, self.num_nodes, self.num_ranks_per_node).any(-1)
            num_tokens_per_rdma_rank = in_node.sum(0, dtype=_I32)
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank

    # ---------------------------------------------------------------------------------- dispatch
    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], is_token_in_rank: torch.Tensor,
                 num_tokens_per_expert: torch.Tensor, expert_alignment: int, num_worst_tokens: int,
                 num_channels: int):
        R, me, P, NN = self.num_ranks, self.rank, self.num_ranks_per_node, self.num_nodes
        C = num_channels
        device = x.device
        num_tokens = x.size(0)
        num_experts = num_tokens_per_expert.numel()
        experts_per_rank = num_experts // R
        multi_node = NN > 1

        # ---- local counts, sent to every rank (an all-to-all of the same payload: one round, where
        # gloo's all-gather walks a ring). It runs while this rank packs its rows and metadata.
        ch_counts = _channel_counts(is_token_in_rank, C)                         # [R, C]
        payload = [ch_counts.view(-1), num_tokens_per_expert.to(_I32).view(-1)]
        if multi_node:
            in_node = is_token_in_rank.view(num_tokens, NN, P).any(-1)           # [T, NN]
            node_ch_counts = _channel_counts(in_node, C)                          # [NN, C]
            payload.append(node_ch_counts.view(-1))
        payload.append(torch.tensor([num_tokens], dtype=_I32, device=device))
        payload = torch.cat(payload).cpu()
        # The counts ride in the call's agreement exchange (deep_ep._agree): every rank checks that all
        # ranks passed the same shapes, dtypes and flags before any row moves.
        work_counts = _agree.exchange(self.comm, payload, "dispatch (count exchange)", async_op=True)
        # Counts too wide to ride inline take a second exchange in wait(): finish it before the rows are
        # packed into the staging buffer, which with shared memory is the area that exchange reuses.
        gathered = work_counts.wait() if not work_counts.inline else None

        # ---- what travels per token: the rows go straight into recv_x (one all-to-all), the per-token
        # metadata travels packed in a second, small one that overlaps with it.
        row_bytes = x.size(1) * x.element_size()
        has_scales = x_scales is not None
        has_topk = topk_idx is not None
        num_topk = topk_idx.size(1) if has_topk else 0
        num_scales = x_scales.size(1) if has_scales else 0
        # Per-token metadata as one row table [T, W] (scales | top-k ids | top-k weights | token index),
        # gathered once by destination like the rows: no per-destination packing.
        scale_bytes = _bytes(x_scales) if has_scales else None
        cols = ([("scales", scale_bytes.size(1))] if has_scales else []) + \
            ([("topk_idx", 4 * num_topk), ("topk_weights", 4 * num_topk)] if has_topk else []) + [("src_idx", 4)]
        col_range, width = {}, 0
        for name, nbytes in cols + ([("nvl_bits", 4)] if multi_node else []):
            col_range[name] = (width, width + nbytes)
            width += nbytes

        # ---- pack (local only): rows sorted by destination, then token, in a reused staging buffer
        n_send = ch_counts.sum(1).tolist()                                         # to each dst
        dst_ids, tok_ids = is_token_in_rank.t().nonzero(as_tuple=True)
        x_bytes = _bytes(x)
        # With the gloo transport the rows go over deep_ep's own streams (deep_ep._rowsock): sendmsg
        # gathers them straight from x, so nothing is packed here.
        streams = self.comm.rows if device.type == "cpu" else None
        if streams is not None:
            row_sends = _row_runs(x_bytes, dst_ids, tok_ids, n_send, me, self._staging)
        else:
            # (with shared memory the staging buffer is this rank's shared area)
            send_rows = self._staging(len(tok_ids) * row_bytes, device).view(len(tok_ids), row_bytes)
            _gather_rows(x_bytes, tok_ids, send_rows)
        lib = _native.library() if device.type == "cpu" else None  # the native helpers (deep_ep._native)
        if lib is not None:  # the same rows in one C loop
            meta_rows = _native.dispatch_pack_meta(lib, tok_ids, num_tokens, scale_bytes, topk_idx, topk_weights)
        else:
            parts = ([scale_bytes] if has_scales else []) + \
                ([_bytes(topk_idx.to(_I32)), _bytes(topk_weights)] if has_topk else []) + \
                [_bytes(torch.arange(num_tokens, dtype=_I32, device=device).view(-1, 1))]
            table = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            meta_rows = table.index_select(0, tok_ids)                             # [sent rows, W (- 4)]
        if not multi_node:
            meta_buf = meta_rows.view(-1)
            send_sizes = [n * width for n in n_send]
        else:
            bit_weights = 1 << torch.arange(P, device=device, dtype=torch.int64)
            # bits[t, b] = mask of the ranks (b, j) that receive token t
            bits = (is_token_in_rank.view(num_tokens, NN, P).to(torch.int64) * bit_weights).sum(-1).to(_I32)
            nvl = _bytes(bits[tok_ids, dst_ids // P].contiguous().view(-1, 1))
            meta_rows = torch.cat([meta_rows, nvl], dim=1)
            packer = _Packer(R)
            for d in range(R):
                packer.add(d, "rows", n_send[d] * width)
                # Forwarder section: rank (b, i) learns which tokens of rank (a, i) need node b.
                if d % P == me % P:
                    packer.add(d, "fwd", int(node_ch_counts[d // P].sum()) * 8)
            send_sizes, send_offsets = packer.layout()
            meta_buf = torch.empty(sum(send_sizes), dtype=torch.uint8, device=device)
            row = 0
            for d in range(R):
                off, nbytes = send_offsets[(d, "rows")]
                if nbytes:
                    meta_buf[off:off + nbytes].view(-1, width).copy_(meta_rows[row:row + n_send[d]])
                row += n_send[d]
                if (d, "fwd") in send_offsets:
                    off, nbytes = send_offsets[(d, "fwd")]
                    if nbytes:
                        b = d // P
                        toks = in_node[:, b].nonzero().view(-1)
                        pair = torch.stack([toks.to(_I32), bits[toks, b]], dim=1)
                        meta_buf[off:off + nbytes].copy_(pair.view(-1).view(torch.uint8))

        # ---- everybody's counts
        if work_counts.inline:
            gathered = work_counts.wait()
        o = 0
        all_ch = gathered[:, o:o + R * C].view(R, R, C); o += R * C                # [src, dst, C]
        all_ne = gathered[:, o:o + num_experts]; o += num_experts                  # [src, E]
        if multi_node:
            all_node_ch = gathered[:, o:o + NN * C].view(R, NN, C); o += NN * C    # [src, node, C]
            fwd_counts = all_node_ch.sum(-1, dtype=_I32)                           # [src, node]
        all_T = gathered[:, o]
        counts = all_ch.sum(-1, dtype=_I32)                                        # [src, dst]
        recv_per_rank = counts.sum(0)                                              # [dst]
        if num_worst_tokens > 0:
            over = (recv_per_rank > num_worst_tokens).nonzero().view(-1).tolist()
            if over:
                d = over[0]
                raise _agree.coordinated(RuntimeError(
                    f"deep_ep.Buffer.dispatch: rank {d} would receive {int(recv_per_rank[d])} tokens, more than "
                    f"`num_worst_tokens`={num_worst_tokens} (ranks over the limit: {over}); raise "
                    f"`num_worst_tokens` to at least {int(recv_per_rank.max())}"))
        n_recv = counts[:, me].tolist()                                            # from each src
        num_recv = sum(n_recv)
        num_rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
        if not multi_node:
            recv_sizes, recv_offsets = [n * width for n in n_recv], None
        else:
            unpacker = _Packer(R)
            for s in range(R):
                unpacker.add(s, "rows", n_recv[s] * width)
                if s % P == me % P:
                    unpacker.add(s, "fwd", int(fwd_counts[s, me // P]) * 8)
            recv_sizes, recv_offsets = unpacker.layout()

        # ---- the data: rows straight into recv_x, metadata alongside
        recv_x = (torch.zeros if num_rows != num_recv else torch.empty)(
            (num_rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=device)
        recv_rows = _bytes(recv_x)[:num_recv]
        recv_buf = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        if streams is not None:
            # One message per pair: the rows, then the metadata (each lands straight in its place).
            recv_at, meta_in, meta_out = [0], [0], [0]
            for n, a, b in zip(n_recv, recv_sizes, send_sizes):
                recv_at.append(recv_at[-1] + n)
                meta_in.append(meta_in[-1] + a)
                meta_out.append(meta_out[-1] + b)
            recv_buf[meta_in[me]:meta_in[me + 1]].copy_(meta_buf[meta_out[me]:meta_out[me + 1]])
            own = tok_ids[sum(n_send[:me]):sum(n_send[:me + 1])]
            _gather_rows(x_bytes, own, recv_rows[recv_at[me]:recv_at[me + 1]])
            # byte ranges (base, offset, bytes) of: 0 x, 1 the gathered rows, 2 meta_buf, 3 recv_x, 4 recv_buf
            gathered, row_ranges = row_sends
            meta_ranges = torch.tensor([[2, meta_out[d], send_sizes[d]] for d in range(R)], dtype=torch.int64)
            pieces, send_counts = [], [0] * R
            for d in range(R):
                if d != me:
                    if d in row_ranges:
                        pieces.append(row_ranges[d])
                    pieces.append(meta_ranges[d:d + 1])
                    send_counts[d] = 1 + (row_ranges[d].size(0) if d in row_ranges else 0)
            recv_ranges = torch.tensor([[b, o, n] for s in range(R) if s != me for b, o, n in (
                (3, recv_at[s] * row_bytes, n_recv[s] * row_bytes), (4, meta_in[s], recv_sizes[s]))],
                dtype=torch.int64)
            empty = torch.empty(0, dtype=torch.uint8)
            bases = [x_bytes.view(-1), gathered.view(-1) if gathered is not None else empty, meta_buf,
                     recv_rows.view(-1), recv_buf]
            streams.exchange_table(bases, torch.cat(pieces) if pieces else torch.empty((0, 3), dtype=torch.int64),
                                   send_counts, recv_ranges.view(-1, 3), [0 if s == me else 2 for s in range(R)],
                                   "dispatch (data)")
        else:
            work_x = self.comm.all_to_all_single(recv_rows, send_rows, n_recv, n_send, op="dispatch (data)",
                                                 async_op=True)
            self.comm.all_to_all_single(recv_buf, meta_buf, recv_sizes, send_sizes, op="dispatch (metadata)")
            work_x.wait()

        # ---- unpack the metadata: columns of the received row table
        if not multi_node:
            recv_meta = recv_buf.view(num_recv, width)
        else:
            recv_meta = torch.cat([recv_buf[off:off + nbytes].view(-1, width) for s in range(R)
                                   for off, nbytes in [recv_offsets[(s, "rows")]]], dim=0)

        def gather_part(name: str, _width: int) -> torch.Tensor:
            lo, hi = col_range[name]
            return recv_meta[:, lo:hi].contiguous()

        def padded(t: torch.Tensor, fill) -> torch.Tensor:
            if num_rows == num_recv:
                return t
            out = torch.full((num_rows,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=device)
            out[:num_recv] = t
            return out

        recv_scales = None
        if has_scales:
            recv_scales = padded(gather_part("scales", num_scales * 4).view(x_scales.dtype).view(num_recv, num_scales),
                                 0)
        recv_topk_idx = recv_topk_weights = None
        if has_topk and lib is not None:  # the same in one C loop (deep_ep._native)
            local, w = _native.dispatch_local_topk(lib, recv_meta, col_range["topk_idx"][0],
                                                   col_range["topk_weights"][0], num_topk, me * experts_per_rank,
                                                   experts_per_rank)
            recv_topk_idx, recv_topk_weights = padded(local, -1), padded(w, 0)
        elif has_topk:
            gidx = gather_part("topk_idx", num_topk * 4).view(_I32).view(num_recv, num_topk).to(torch.int64)
            local = gidx - me * experts_per_rank
            is_local = (gidx >= 0) & (local >= 0) & (local < experts_per_rank)
            recv_topk_idx = padded(torch.where(is_local, local, torch.full_like(local, -1)), -1)
            w = gather_part("topk_weights", num_topk * 4).view(torch.float32).view(num_recv, num_topk)
            recv_topk_weights = padded(torch.where(is_local, w, torch.zeros_like(w)), 0)
        recv_src_idx = padded(gather_part("src_idx", 4).view(_I32).view(-1), -1)

        if num_worst_tokens > 0:
            num_recv_tokens_per_expert_list: List[int] = []
        else:
            per_expert = all_ne[:, me * experts_per_rank:(me + 1) * experts_per_rank].sum(0)
            a = expert_alignment
            num_recv_tokens_per_expert_list = [(int(v) + a - 1) // a * a for v in per_expert.tolist()]

        # ---- handle
        channel_prefix_matrix = torch.cumsum(ch_counts, dim=1, dtype=_I32)
        recv_counts_ch = all_ch[:, me, :].to(_I32)                                  # [src, C]
        rank_prefix = torch.cumsum(counts.to(_I32), dim=0, dtype=_I32)             # [src, dst]
        to_dev = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
        if not multi_node:
            send_head = _slots(is_token_in_rank, C)
            handle = (to_dev(rank_prefix), channel_prefix_matrix, to_dev(_exclusive_cumsum(recv_counts_ch, 1)),
                      recv_src_idx, is_token_in_rank, send_head)
        else:
            rdma_channel_prefix_matrix = torch.cumsum(node_ch_counts, dim=1, dtype=_I32)
            my_node, my_local = me // P, me % P
            fwd_srcs = [a * P + my_local for a in range(NN)]
            recv_rdma_channel_prefix_matrix = torch.cumsum(all_node_ch[fwd_srcs, my_node, :], dim=1, dtype=_I32)
            recv_rdma_rank_prefix_sum = torch.cumsum(fwd_counts[fwd_srcs, my_node], dim=0, dtype=_I32)
            recv_gbl_rank_prefix_sum = torch.cumsum(counts[:, me], dim=0, dtype=_I32)
            seg_start = recv_gbl_rank_prefix_sum - counts[:, me].to(_I32)
            recv_gbl_channel_prefix_matrix = seg_start.view(R, 1) + _exclusive_cumsum(recv_counts_ch, 1)
            src_rank_of_row = torch.repeat_interleave(torch.arange(R, dtype=_I32), torch.tensor(n_recv))
            meta = torch.zeros((num_rows, 2), dtype=_I32, device=device)
            meta[:num_recv, 0] = to_dev(src_rank_of_row // P)
            meta[:num_recv, 1] = gather_part("nvl_bits", 4).view(_I32).view(-1)
            recv_src_meta = meta.view(torch.uint8).view(num_rows, 8)
            send_rdma_head = _slots(in_node, C)
            send_nvl_head = self._send_nvl_head(recv_buf, recv_offsets, all_T, C, fwd_srcs, device)
            if num_worst_tokens > 0:
                # No CPU sync in the CUDA engine: the forwarded count M is bounded by P * W there, and
                # rows past M are -1 (docs/semantics.md); the same shape here.
                pad = torch.full((P * num_worst_tokens, P), -1, dtype=_I32, device=send_nvl_head.device)
                pad[:send_nvl_head.size(0)] = send_nvl_head
                send_nvl_head = pad
            handle = (is_token_in_rank, rdma_channel_prefix_matrix, channel_prefix_matrix,
                      to_dev(recv_rdma_channel_prefix_matrix), to_dev(recv_rdma_rank_prefix_sum),
                      to_dev(recv_gbl_channel_prefix_matrix), to_dev(recv_gbl_rank_prefix_sum),
                      recv_src_meta, send_rdma_head, send_nvl_head)
        recv_x_out = (recv_x, recv_scales) if has_scales else recv_x
        return recv_x_out, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle

    def _send_nvl_head(self, recv_buf, recv_offsets, all_T, num_channels, fwd_srcs, device) -> torch.Tensor:
        """Forwarder view: one row per token rank (a, my local index) sends to my node, ordered by source
        node then source token; column j = slot towards local rank j within the token's channel."""
        P = self.num_ranks_per_node
        src_tok, bits, chan = [], [], []
        for s in fwd_srcs:
            off, nbytes = recv_offsets[(s, "fwd")]
            pair = recv_buf[off:off + nbytes].view(_I32).view(-1, 2)
            src_tok.append(pair[:, 0])
            bits.append(pair[:, 1])
            per = _channel_bounds(int(all_T[s]), num_channels)
            chan.append(pair[:, 0] // max(per, 1))
        if not src_tok:
            return torch.empty((0, P), dtype=_I32, device=device)
        bits_all = torch.cat(bits)
        chan_all = torch.cat(chan).to(torch.int64)
        m = bits_all.numel()
        if m == 0:
            return torch.empty((0, P), dtype=_I32, device=device)
        goes = ((bits_all.view(m, 1) >> torch.arange(P, device=bits_all.device, dtype=_I32)) & 1).bool()  # [M, P]
        # Slot = earlier rows (in this order) of the same channel going to j. Rows are ordered by source
        # node, not by channel, so count per channel with a stable sort by channel.
        order = torch.sort(chan_all, stable=True).indices
        g = goes[order].to(_I32)
        incl = torch.cumsum(g, dim=0, dtype=_I32)
        ch_sorted = chan_all[order]
        first = torch.ones(m, dtype=torch.bool, device=g.device)
        first[1:] = ch_sorted[1:] != ch_sorted[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(m, device=g.device), torch.zeros(m, dtype=torch.int64, device=g.device)), 0).values
        base = torch.cat([torch.zeros((1, P), dtype=_I32, device=g.device), incl], 0)[group_start]
        slot_sorted = incl - base - 1
        slot = torch.empty_like(slot_sorted)
        slot[order] = slot_sorted
        out = torch.where(goes, slot, torch.full_like(slot, -1))
        return out.to(device)

    # --------------------------------------------------------------------------- cached dispatch
    def cached_dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: tuple):
        R, me = self.num_ranks, self.rank
        device = x.device
        if len(handle) == 6:
            rank_prefix, channel_prefix, _, recv_src_idx, is_token_in_rank, _ = handle
            n_send = channel_prefix[:, -1].tolist()
            col = rank_prefix[:, me]
            num_rows = recv_src_idx.size(0)
        else:
            is_token_in_rank, channel_prefix, recv_gbl_rank_prefix_sum = handle[0], handle[2], handle[6]
            n_send = channel_prefix[:, -1].tolist()
            col = recv_gbl_rank_prefix_sum
            num_rows = handle[7].size(0)
        col = col.tolist()
        n_recv = [col[0]] + [col[s] - col[s - 1] for s in range(1, R)]
        num_recv = sum(n_recv)
        # Agreement first (deep_ep._agree): same shapes and dtypes everywhere, and the row counts of the
        # handles match pairwise, so the all-to-alls below get consistent sizes on every rank.
        _agree.exchange(self.comm, torch.tensor(n_send + n_recv, dtype=torch.int64), "cached dispatch (agreement)",
                        pairs=True)

        row_bytes = x.size(1) * x.element_size()
        _, tok_ids = is_token_in_rank.t().nonzero(as_tuple=True)
        send_rows = self._staging(len(tok_ids) * row_bytes, device).view(len(tok_ids), row_bytes)
        lib = _native.library() if device.type == "cpu" else None
        if lib is not None and len(tok_ids) and x.stride(-1) == 1:
            # Non-temporal stores (deep_ep._native): the staging buffer (with shared memory: this rank's
            # shared area) is read by the transport next, not by this core.
            _native.copy_rows(lib, _bytes(x), tok_ids, [send_rows], None, torch.arange(len(tok_ids)))
        else:
            torch.index_select(_bytes(x), 0, tok_ids, out=send_rows)
        recv_x = (torch.zeros if num_rows != num_recv else torch.empty)((num_rows,) + tuple(x.shape[1:]),
                                                                        dtype=x.dtype, device=device)
        work = self.comm.all_to_all_single(_bytes(recv_x)[:num_recv], send_rows, n_recv, n_send,
                                           op="cached dispatch (data)", async_op=x_scales is not None)
        if x_scales is None:
            return recv_x
        recv_scales = torch.zeros((num_rows, x_scales.size(1)), dtype=x_scales.dtype, device=device)
        self.comm.all_to_all_single(recv_scales[:num_recv], x_scales[tok_ids], n_recv, n_send,
                                    op="cached dispatch (scales)")
        work.wait()
        return recv_x, recv_scales

    # ----------------------------------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor],
                bias: Sequence[torch.Tensor]):
        R, me, P, NN = self.num_ranks, self.rank, self.num_ranks_per_node, self.num_nodes
        device = x.device
        if len(handle) == 6:
            rank_prefix, channel_prefix, is_token_in_rank = handle[0], handle[1], handle[4]
            col = rank_prefix[:, me].tolist()
        else:
            is_token_in_rank, channel_prefix = handle[0], handle[2]
            col = handle[6].tolist()
        num_tokens = is_token_in_rank.size(0)
        n_back = [col[0]] + [col[s] - col[s - 1] for s in range(1, R)]   # rows I hold for each source
        num_recv = sum(n_back)
        n_mine = channel_prefix[:, -1].tolist()                           # rows coming back from each dst
        hidden = x.size(1)
        _agree.exchange(self.comm, torch.tensor(n_back + n_mine, dtype=torch.int64), "combine (agreement)", pairs=True)

        # ---- collective(s): the rows go back to their sources (x[:num_recv] is already ordered by source);
        # the top-k weights first, so that the rows can then be reduced where they arrived (shared memory)
        send_x = x[:num_recv]
        w_rows = None
        if topk_weights is not None:
            w_rows = torch.empty((sum(n_mine), topk_weights.size(1)), dtype=torch.float32, device=device)
            self.comm.all_to_all_single(w_rows, topk_weights[:num_recv].contiguous(), n_mine, n_back,
                                        op="combine (top-k weights)")
        in_place = self.comm.all_to_all_views(send_x, n_mine, n_back, op="combine (data)") \
            if NN == 1 and device.type == "cpu" else None
        if in_place is not None:
            rows, release = in_place
        else:
            rows, release = torch.empty((sum(n_mine), hidden), dtype=x.dtype, device=device), None
            self.comm.all_to_all_single(rows, send_x, n_mine, n_back, op="combine (data)")

        # ---- reduce in fp32, ranks ascending (per node first when there are several nodes)
        dst_ids, tok_ids = is_token_in_rank.t().nonzero(as_tuple=True)
        bounds = [0]
        for n in n_mine:
            bounds.append(bounds[-1] + n)
        if NN == 1:
            try:
                combined_x = reduce_rows_by_token(rows, tok_ids, bounds, num_tokens, bias)
            finally:
                if release is not None:
                    release()
        else:
            acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=device)
            for b in bias:
                acc += b.float()
            rows_f = rows.float()
            for b in range(NN):
                lo, hi = bounds[b * P], bounds[(b + 1) * P]
                if hi == lo:
                    continue
                partial = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=device)
                for d in range(b * P, (b + 1) * P):
                    if n_mine[d]:
                        partial.index_add_(0, tok_ids[bounds[d]:bounds[d + 1]], rows_f[bounds[d]:bounds[d + 1]])
                toks = torch.unique(tok_ids[lo:hi])
                acc.index_add_(0, toks, partial[toks].to(x.dtype).float())
            combined_x = acc.to(x.dtype)
        combined_w = None
        if w_rows is not None:
            combined_w = torch.zeros((num_tokens, topk_weights.size(1)), dtype=torch.float32, device=device)
            for d in range(R):
                if n_mine[d]:
                    combined_w.index_add_(0, tok_ids[bounds[d]:bounds[d + 1]], w_rows[bounds[d]:bounds[d + 1]])
        return combined_x, combined_w
