"""Low-latency (LL) mode of the portable engine: dispatch/combine over torch.distributed collectives.

`deep_ep.Buffer` validates every user argument and handles streams/events/``async_finish``; this
module does the work, with the exact outputs `docs/semantics.md` specifies ("Low-latency dispatch",
"Low-latency combine", "Double buffer").

Wire protocol (per call, at most two collectives):

1. **Header exchange** (one all-to-all round of the same vector to every rank; gloo's all-gather
   would walk a ring): every rank publishes one int64 vector ``[signature (10 words),
   rows it sends to each rank (R), rows it expects from each rank (R)]``. The signature carries the
   call kind and its shape arguments, so ranks that diverged (different ``num_experts``, hidden,
   FP8 flags, or dispatch on one rank and combine on another) all raise the same error instead of
   deadlocking; with the full count matrix every rank also knows the receive splits.
2. **Data exchange** (`all_to_all_single`, skipped when nothing moves anywhere): rows grouped by
   destination rank.

   * Dispatch sends one message per (token, destination rank), deduplicated: ``[src token index
     (int32) | the token's K top-k ids (int32) | payload]``, payload = BF16 ``x`` (``2H`` bytes) or,
     with FP8, the sender-side cast ``x_fp8`` (``H`` bytes) + float32 ``scale_inv`` (``4 * H/128``
     bytes). The receiver expands each message to its ``(token, k)`` rows for its own experts.
   * Combine sends one BF16 row per ``(token, k)`` pair back to the token's owner, grouped by local
     expert then by the dispatch order; the owner matches them to its own ``topk_idx`` (sorted by
     expert, stable) and reduces with its weights in ``k`` order in float32.

**Push path** (same-host shared-memory transport, CPU tensors, no shrink mode): the rows are written
straight into the receivers' memory, one copy instead of gather + send + receive + unpack. Each rank's
engine area (`deep_ep._shm`) mirrors the RDMA buffer's layout (`LowLatencyLayout`); the receive slot
of the call's double-buffer slot holds, for dispatch, ``recv_x`` itself (``[E/R, R*T_max, H]``, the
tensor the call returns, as DeepEP's ``recv_x`` lives in its RDMA buffer), then ``src_info`` and the
FP8 scales (row-major, copied into the returned column-major tensor); for combine, the rows in the
arrival order above. The dispatch header carries per-expert pair counts instead of message counts, so
every sender knows where its rows go (after the rows of the lower ranks, in token order); the header
exchange also guarantees that every receiver is done with the slot's previous contents (it entered
this call). After writing, an exchange of no bytes (`Communicator.fence_round`) makes the writes
visible. Both paths give the same bits.

With ``return_recv_hook`` the header exchange runs at call time and the data exchange is started
asynchronously; ``hook()`` waits for it and fills the already returned tensors in place.

Shrink mode: while any rank is masked, the exchanges above run as point-to-point messages among the
unmasked ranks only (`Communicator.p2p` on the private gloo group), so a dead masked rank never blocks
the others. On that path a peer whose process is found gone is masked on the spot (as DeepEP masks a
rank that times out) and the call completes without its data; a peer that is alive but silent still
fails the call with the Communicator's timeout error, and so does any failure while no rank is masked
(collectives cannot leave a rank out). Every rank must hold the same mask: a rank that sees a
different mask waits for a message that never comes. A rank that is masked in its own mask is cut
off: it sends and receives nothing, its dispatch returns zero counts and its combine zeros.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import _agree, _native
from .._comm import Communicator
from ..config import LowLatencyLayout
from ..quant import GROUP_SIZE, logfmt10_round, pack_ue8m0, per_token_cast_to_fp8
from .local_buffers import DoubleBufferSlots, LocalBuffers

__all__ = ["PortableLowLatency"]

# Header layout (int64 words). The signature words are compared across ranks.
_KIND_DISPATCH = 1
_KIND_COMBINE = 2
_HEADER_WORDS = 10
_H_KIND, _H_TMAX, _H_HIDDEN, _H_EXPERTS, _H_TOPK, _H_FP8, _H_ROUND, _H_UE8M0, _H_OVERFLOW, _H_PUSH = range(10)
_DISPATCH_SIGNATURE = ((_H_TMAX, "num_max_dispatch_tokens_per_rank"), (_H_HIDDEN, "x (hidden size)"),
                       (_H_EXPERTS, "num_experts"), (_H_TOPK, "topk_idx (num_topk)"), (_H_FP8, "use_fp8"),
                       (_H_ROUND, "round_scale"), (_H_UE8M0, "use_ue8m0"),
                       (_H_PUSH, "the data path (shared-memory push: CPU tensors on every rank)"))
_COMBINE_SIGNATURE = ((_H_TMAX, "handle (num_max_dispatch_tokens_per_rank)"), (_H_HIDDEN, "handle (hidden)"),
                      (_H_EXPERTS, "handle (num_experts)"),
                      (_H_PUSH, "the data path (shared-memory push: CPU tensors on every rank)"))
_KIND_FAILED = 3  # shrink mode: this rank raised before its header exchange (deep_ep._agree)
_KIND_NAMES = {_KIND_DISPATCH: "low_latency_dispatch", _KIND_COMBINE: "low_latency_combine"}

# Point-to-point tags, one per phase of a call. They are constants on purpose: gloo matches the messages
# of one (pair, tag) in FIFO order and every rank issues its calls in the same order, whereas a tag
# derived from a call counter would desynchronise when a masked rank skips calls and later rejoins.
# The base keeps them apart from anything else the user might send on the private group.
_TAG_BASE = 0x4C4C0000  # "LL"
_PHASE_HEADER, _PHASE_DATA, _PHASE_BARRIER = 1, 2, 3

_SRC_BYTES = 4  # int32 source token index at the head of a dispatch message
_TOPK_ID_BYTES = 4  # top-k ids travel as int32


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[M, n]`` of any dtype -> ``[M, n * itemsize]`` uint8 (contiguous)."""
    return t.contiguous().view(torch.uint8)


def _from_bytes(buf: torch.Tensor, begin: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``[begin, end)`` of a ``[M, B]`` uint8 tensor reinterpreted as ``dtype`` (a copy)."""
    return buf[:, begin:end].contiguous().view(dtype)


def _exclusive_cumsum(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.cumsum(t, dim=dim) - t


class _Exchange:
    """One in-flight data exchange; `wait()` finishes it and returns the peers found gone.

    Wraps a collective work handle (or nothing, when no rank sends anything) or a point-to-point
    `P2PWork`; `finish` copies host-staged data back to the device.
    """

    def __init__(self, work=None, p2p: bool = False, tolerate_gone: bool = False,
                 finish: Optional[Callable[[], None]] = None) -> None:
        self._work, self._p2p, self._tolerate_gone, self._finish = work, p2p, tolerate_gone, finish
        self._failed: Optional[List[int]] = None

    def wait(self) -> List[int]:
        if self._failed is not None:
            return self._failed
        failed: List[int] = []
        if self._work is not None:
            if self._p2p:
                failed = self._work.wait(tolerate_gone=self._tolerate_gone)
            else:
                self._work.wait()
        if self._finish is not None:
            self._finish()
        self._failed = failed
        return failed


class PortableLowLatency(DoubleBufferSlots):
    """Low-latency dispatch/combine on torch collectives (CPU via gloo, CUDA via NCCL or host staging).

    Args:
        comm: the Buffer's `Communicator`.
        local_buffers: the Buffer's raw buffers; the RDMA one holds the zero-copy combine send areas.
        num_rdma_bytes: size of the RDMA buffer (the Buffer checked it against the layout).
        enable_shrink: allow masking ranks (`update_mask` and friends).
    """

    # Shrink mode: a peer found gone during a call is masked instead of failing the call
    # (tests/test_faults.py runs its shrink scenario when this is set).
    masks_gone_peers = True

    def __init__(self, comm: Communicator, local_buffers: LocalBuffers, num_rdma_bytes: int,
                 enable_shrink: bool) -> None:
        self.comm = comm
        self.local_buffers = local_buffers
        self.num_rdma_bytes = num_rdma_bytes
        self.enable_shrink = enable_shrink
        # Double buffer: the slot the next LL call uses, and how often each slot has been taken
        # (a hook remembers its slot's use count and detects reuse by comparing).
        self._init_slots()
        self._mask = torch.zeros(comm.size, dtype=torch.int32)
        self._scratch = {}  # (slot, name, device) -> uint8 buffer reused by that slot's calls

    # ------------------------------------------------------------------------------------------
    # Routing (the double buffer is DoubleBufferSlots)

    def _route(self) -> Tuple[bool, List[int], bool]:
        """``(participating, peers, use_p2p)``: whether this rank communicates, with whom, and how."""
        size = self.comm.size
        if not self.enable_shrink:
            return True, list(range(size)), False
        # Shrink mode exchanges point to point even while no rank is masked: a rank that dies then
        # fails only its own messages and is masked, where a collective would fail as a whole.
        if int(self._mask[self.comm.rank]) != 0:
            return False, [], True
        return True, [p for p in range(size) if int(self._mask[p]) == 0], True

    def _rank_ok(self, participating: bool, use_p2p: bool, device: torch.device) -> Optional[torch.Tensor]:
        """Bool ``[R]`` of the ranks data may come from / go to, or None when all may."""
        if not use_p2p:
            return None
        if not participating:
            return torch.zeros(self.comm.size, dtype=torch.bool, device=device)
        return (self._mask == 0).to(device)


    # ------------------------------------------------------------------------------------------
    # Exchanges

    def _gather_header(self, vec: torch.Tensor, peers: List[int], use_p2p: bool,
                       op: str) -> Tuple[torch.Tensor, List[int]]:
        """All-gather the int64 header among `peers`: ``([R, W] table (CPU), peers that answered)``.

        Rows of ranks outside the answering peers are zero. In shrink mode a peer whose process is
        gone is masked instead of failing the call.
        """
        size = self.comm.size
        if not use_p2p:  # the call's agreement exchange carries the header (deep_ep._agree)
            return _agree.exchange(self.comm, vec, op), peers
        table = torch.zeros(size, vec.numel(), dtype=torch.int64)
        work = self.comm.p2p({p: vec for p in peers}, {p: table[p] for p in peers}, _TAG_BASE + _PHASE_HEADER, op)
        gone = self._mask_gone(work.wait(tolerate_gone=self.enable_shrink))
        table[gone] = 0
        return table, [p for p in peers if p not in gone]

    def _reused(self, slot: int, name: str, shape: Tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A tensor of `shape` kept per double-buffer slot and reused by the slot's next call (fresh large
        allocations page-fault on every call). Safe: a slot's results are invalid once the slot is reused
        (docs/semantics.md, "Double buffer"), and a hook of a reused slot refuses to run."""
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        key = (slot, name, device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._scratch[key] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def _send_area(self, slot: int, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   use_p2p: bool) -> torch.Tensor:
        """Where to build the rows to send: this rank's shared-memory send area (same-host transport:
        the exchange then copies nothing on the sending side), else a buffer reused per slot."""
        if not use_p2p and device.type == "cpu":
            numel = 1
            for n in shape:
                numel *= int(n)
            area = self.comm.send_buffer(numel * torch.empty((), dtype=dtype).element_size())
            if area is not None:
                return area.view(dtype).view(shape)
        return self._reused(slot, name, shape, dtype, device)

    def _exchange_rows(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int], peers: List[int],
                       use_p2p: bool, nothing_moves: bool, op: str, slot: int) -> Tuple[torch.Tensor, _Exchange]:
        """Start moving rows of `send` (grouped by destination) and return ``(recv buffer, exchange)``.

        The receive buffer is filled once the exchange's `wait()` returns (rows from peers it reports
        gone are left unfilled). `nothing_moves` (no rank sends anything, known to all ranks from the
        header table) skips the collective.
        """
        recv = self._reused(slot, "recv", (sum(recv_counts),) + tuple(send.shape[1:]), send.dtype, send.device)
        if not use_p2p:
            if nothing_moves:
                return recv, _Exchange()
            work = self.comm.all_to_all_single(recv, send, recv_counts, send_counts, op=op, async_op=True)
            return recv, _Exchange(work)

        # Point-to-point among the unmasked peers; CUDA tensors are staged through host memory.
        send_host = send.cpu() if send.is_cuda else send
        recv_host = torch.empty(recv.shape, dtype=recv.dtype) if recv.is_cuda else recv
        send_offsets = [0] + torch.tensor(send_counts, dtype=torch.int64).cumsum(0).tolist()
        recv_offsets = [0] + torch.tensor(recv_counts, dtype=torch.int64).cumsum(0).tolist()
        sends = {p: send_host[send_offsets[p]:send_offsets[p + 1]] for p in peers}
        recvs = {p: recv_host[recv_offsets[p]:recv_offsets[p + 1]] for p in peers}
        work = self.comm.p2p(sends, recvs, _TAG_BASE + _PHASE_DATA, op)
        finish = (lambda: recv.copy_(recv_host)) if recv.is_cuda else None
        return recv, _Exchange(work, p2p=True, tolerate_gone=self.enable_shrink, finish=finish)

    def _p2p_barrier(self, peers: List[int], op: str) -> None:
        token = torch.zeros(1, dtype=torch.int32)
        sinks = {p: torch.empty(1, dtype=torch.int32) for p in peers}
        work = self.comm.p2p({p: token for p in peers}, sinks, _TAG_BASE + _PHASE_BARRIER, op)
        self._mask_gone(work.wait(tolerate_gone=self.enable_shrink))

    def failure_exchange(self, op: str) -> None:
        """Shrink mode: this rank raised before its header exchange; send the peers a header that says so
        (its message is in the store, deep_ep._agree), so that they raise it at once."""
        participating, peers, use_p2p = self._route()
        if participating:
            size = self.comm.size
            self._gather_header(self._header(_KIND_FAILED, (), [0] * size, [0] * size), peers, use_p2p, op)

    def _mask_gone(self, gone: List[int]) -> List[int]:
        """Shrink mode: mask the peers whose process is gone (as DeepEP masks ranks that time out)."""
        for peer in gone:
            self._mask[peer] = 1
        return gone

    def _header(self, kind: int, words: Sequence[Tuple[int, int]], send_counts: Sequence[int],
                expect_counts: Optional[Sequence[int]] = None, extra: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``[signature (10 words) | send_counts (R) | expect_counts (R) | extra]`` int64 (`extra`: ints)."""
        size = self.comm.size
        head = [0] * _HEADER_WORDS  # a list first: one tensor construction, not one tensor write per word
        head[_H_KIND] = kind
        for index, value in words:
            head[index] = int(value)
        head += [int(c) for c in send_counts]
        head += [int(c) for c in expect_counts] if expect_counts is not None else [0] * size
        if extra is not None:
            head += extra
        return torch.tensor(head, dtype=torch.int64)

    def _push_areas(self, use_p2p: bool, device: torch.device, layout: LowLatencyLayout, slot: int,
                    need: int) -> Optional[List[torch.Tensor]]:
        """The push path's receive slot `slot` of every rank (uint8 views of `need` bytes, indexed by rank),
        or None where the push path does not apply: shrink mode, CUDA tensors, gloo transport, or an
        engine area too small for the layout. The ranks derive the answer from agreed values (the header
        signature compares it)."""
        if use_p2p or device.type != "cpu":
            return None
        offset = layout.recv_offset(slot)
        areas = self.comm.engine_areas("low_latency (receive slots)")
        if areas is None or need > layout.recv_bytes or offset + layout.recv_bytes > areas[0].numel():
            return None
        return [area[offset:offset + need] for area in areas]

    def _check_signatures(self, table: torch.Tensor, peers: List[int], kind: int,
                          signature: Sequence[Tuple[int, str]]) -> None:
        """Raise the same error on every rank when the peers' headers disagree."""
        what = _KIND_NAMES[kind]
        rows = table[:, :_HEADER_WORDS].tolist()  # one conversion, not one per word
        kinds = {p: int(rows[p][_H_KIND]) for p in peers}
        failed = [p for p, k in kinds.items() if k == _KIND_FAILED]
        if failed:  # shrink mode: a rank raised before its header exchange; its message is in the store
            errors = [(p, *_agree.read_error(self.comm, p)) for p in failed]
            cls = {"ValueError": ValueError, "TypeError": TypeError}.get(errors[0][1], RuntimeError)
            texts = "; ".join(f"rank {p} raised {kind}: {text}" for p, kind, text in errors)
            raise _agree.coordinated(cls(f"deep_ep.Buffer.{what}: {texts} (no data moved on any rank, and the "
                                         f"Buffer is still usable)"))
        if len(set(kinds.values())) > 1:
            calls = ", ".join(f"rank {p}: {_KIND_NAMES.get(k, f'kind {k}')}" for p, k in kinds.items())
            raise _agree.coordinated(RuntimeError(
                f"deep_ep.Buffer.{what}: ranks diverged, they called different low-latency operations ({calls}); "
                f"every rank must issue the same sequence of calls"))
        for index, name in signature:
            values = {p: int(rows[p][index]) for p in peers}
            if len(set(values.values())) > 1:
                listing = ", ".join(f"rank {p}: {v}" for p, v in values.items())
                raise _agree.coordinated(
                    ValueError(f"deep_ep.Buffer.{what}: `{name}` must be the same on every rank, got {listing}"))

    # ------------------------------------------------------------------------------------------
    # Dispatch

    def _check_dispatch_header(self, table: torch.Tensor, peers: List[int], t_max: int) -> None:
        """The dispatch header's checks, raised alike on every rank: the signatures agree, and no rank
        routes more than `t_max` pairs to one expert."""
        self._check_signatures(table, peers, _KIND_DISPATCH, _DISPATCH_SIGNATURE)
        overflowing = [p for p in peers if int(table[p, _H_OVERFLOW]) > 0]
        if overflowing:
            raise _agree.coordinated(RuntimeError(
                f"deep_ep.Buffer.low_latency_dispatch: `topk_idx` on rank(s) {overflowing} routes more than "
                f"num_max_dispatch_tokens_per_rank={t_max} (token, k) pairs to one expert (a token lists the "
                f"same expert several times); a rank's block per expert holds at most {t_max} rows"))

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                 num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                 dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
                 use_ue8m0: bool, return_recv_hook: bool):
        """Send each token to the ranks of its top-k experts; receive per local expert.

        Args:
            x: ``[T, H]`` bf16, ``T <= num_max_dispatch_tokens_per_rank``, ``H % 128 == 0``.
            topk_idx: ``[T, K]`` int64 (or int32) global expert ids, -1 = none.
            num_max_dispatch_tokens_per_rank: ``T_max``, the same on every rank.
            num_experts: ``E``, a multiple of the number of ranks ``R``.
            cumulative_local_expert_recv_stats: optional int32 ``[E/R]``; ``recv_count`` is added.
            dispatch_wait_recv_cost_stats: optional int64 ``[R]``; wait nanoseconds are added for every
                source that sent rows.
            use_fp8, round_scale, use_ue8m0: the FP8 cast (on the sender) and the scale format.
            return_recv_hook: start the receive and return a hook that completes it.

        Returns:
            ``(recv_x, recv_count, handle, hook)``: ``recv_x`` bf16 ``[E/R, R*T_max, H]``, or ``(fp8
            [E/R, R*T_max, H], scales)`` with float32 ``[E/R, R*T_max, H/128]`` or int32
            ``[E/R, R*T_max, ceil(H/512)]`` (UE8M0) column-major scales; ``recv_count`` int32 ``[E/R]``;
            ``handle = (src_info int32 [E/R, R*T_max], layout_range int64 [E/R, R], T_max, H, E)``;
            ``hook`` a callable or None. Rows past ``recv_count`` of ``recv_x``/scales are unspecified.
        """
        comm = self.comm
        size, rank = comm.size, comm.rank
        device = x.device
        num_tokens, hidden = x.shape
        num_topk = topk_idx.size(1)
        t_max = num_max_dispatch_tokens_per_rank
        num_local = num_experts // size
        num_rows = size * t_max
        num_scales = hidden // GROUP_SIZE
        assert num_experts % size == 0 and hidden % GROUP_SIZE == 0 and num_tokens <= t_max

        slot, use = self._begin_call()
        participating, peers, use_p2p = self._route()
        rank_ok = self._rank_ok(participating, use_p2p, device)
        row_bytes = hidden if use_fp8 else 2 * hidden
        slot_rows = num_local * num_rows
        push = self._push_areas(use_p2p, device, LowLatencyLayout(t_max, hidden, num_experts), slot,
                                slot_rows * (row_bytes + 4 + (4 * num_scales if use_fp8 else 0)))

        # Outputs (allocated now so that hook mode can return them before the data arrives).
        x_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        if push is not None:  # recv_x is this rank's receive slot, which the senders write into
            recv_x = push[rank][:slot_rows * row_bytes].view(x_dtype).view(num_local, num_rows, hidden)
        else:
            recv_x = self._reused(slot, "recv_x", (num_local, num_rows, hidden), x_dtype, device)
        if use_fp8:
            if use_ue8m0:
                num_packed = (num_scales + 3) // 4
                scales = torch.empty((num_local, num_packed, num_rows), dtype=torch.int32,
                                     device=device).transpose(1, 2)
            else:
                scales = torch.empty((num_local, num_scales, num_rows), dtype=torch.float32,
                                     device=device).transpose(1, 2)
        else:
            scales = None
        recv_count = torch.zeros(num_local, dtype=torch.int32, device=device)
        src_info = torch.full((num_local, num_rows), -1, dtype=torch.int32, device=device)
        layout_range = torch.zeros((num_local, size), dtype=torch.int64, device=device)
        handle = (src_info, layout_range, t_max, hidden, num_experts)
        recv_x_out = (recv_x, scales) if use_fp8 else recv_x

        if not participating:
            return recv_x_out, recv_count, handle, (lambda: None) if return_recv_hook else None
        if push is not None:
            return self._dispatch_push(push, x, topk_idx, t_max, num_experts, use_fp8, round_scale, use_ue8m0,
                                       recv_x_out, recv_count, handle, cumulative_local_expert_recv_stats,
                                       dispatch_wait_recv_cost_stats, return_recv_hook, slot, use)

        # Sender side: one message per (token, destination rank), destinations ascending, tokens in order.
        topk = topk_idx.to(torch.int64)
        valid = topk >= 0
        dest = torch.where(valid, torch.div(topk, num_local, rounding_mode="floor"), torch.full_like(topk, -1))
        if rank_ok is not None:
            valid &= rank_ok[dest.clamp(min=0)]
        is_sent = torch.zeros((num_tokens, size + 1), dtype=torch.bool, device=device)
        is_sent.scatter_(1, torch.where(valid, dest, torch.full_like(dest, size)), True)
        is_sent = is_sent[:, :size]
        msg_dest, msg_token = is_sent.t().nonzero(as_tuple=True)
        send_counts = is_sent.sum(dim=0).tolist()
        # A (source, expert) block holds at most T_max rows; only duplicate experts in a row exceed it.
        pairs_per_expert = torch.bincount(topk[valid], minlength=num_experts)
        overflow = int((pairs_per_expert > t_max).sum()) if pairs_per_expert.numel() else 0

        words = ((_H_TMAX, t_max), (_H_HIDDEN, hidden), (_H_EXPERTS, num_experts), (_H_TOPK, num_topk),
                 (_H_FP8, use_fp8), (_H_ROUND, round_scale), (_H_UE8M0, use_ue8m0), (_H_OVERFLOW, overflow))
        start_ns = time.perf_counter_ns()
        table, peers = self._gather_header(self._header(_KIND_DISPATCH, words, send_counts), peers, use_p2p,
                                           "low_latency_dispatch (header exchange)")
        header_ns = time.perf_counter_ns() - start_ns
        self._check_dispatch_header(table, peers, t_max)
        counts = table[:, _HEADER_WORDS:_HEADER_WORDS + size]
        recv_counts = counts[:, rank].tolist()

        # Pack: [src index | top-k ids | payload (| scales)] as bytes, each column range gathered straight
        # into the send area (no intermediate rows).
        if use_fp8:
            x_fp8, scale_inv = per_token_cast_to_fp8(x, round_scale)
            sources = [x_fp8.view(torch.uint8), _as_bytes(scale_inv)]
        else:
            sources = [_as_bytes(x)]
        head = [_as_bytes(msg_token.to(torch.int32).unsqueeze(1)),
                _as_bytes(topk.to(torch.int32).index_select(0, msg_token))]
        width = sum(int(t.size(1)) for t in head) + sum(int(t.size(1)) for t in sources)
        send_buf = self._send_area(slot, "send", (int(msg_token.numel()), width), torch.uint8, device, use_p2p)
        col = 0
        for part in head:
            send_buf[:, col:col + part.size(1)].copy_(part)
            col += part.size(1)
        for src in sources:
            torch.index_select(src, 0, msg_token, out=send_buf[:, col:col + src.size(1)])
            col += src.size(1)
        recv_buf, exchange = self._exchange_rows(send_buf, send_counts, recv_counts, peers, use_p2p,
                                                 int(counts.sum()) == 0, "low_latency_dispatch (data exchange)", slot)

        def finish() -> None:
            wait_start = time.perf_counter_ns()
            gone = exchange.wait()
            waited_ns = header_ns + time.perf_counter_ns() - wait_start
            rows, counts = recv_buf, list(recv_counts)
            if gone:  # shrink mode: drop what the peers found gone should have sent
                source = torch.repeat_interleave(torch.arange(size), torch.tensor(recv_counts, dtype=torch.int64))
                keep = ~torch.isin(source, torch.tensor(gone, dtype=torch.int64))
                rows = recv_buf[keep.to(recv_buf.device)]
                counts = [0 if p in gone else c for p, c in enumerate(recv_counts)]
            self._unpack_dispatch(rows, counts, num_topk, hidden, num_local, num_rows, use_fp8, use_ue8m0,
                                  recv_x, scales, recv_count, src_info, layout_range)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.dtype))
            if dispatch_wait_recv_cost_stats is not None:
                self._add_wait(dispatch_wait_recv_cost_stats, counts, waited_ns)

        return recv_x_out, recv_count, handle, self._make_hook(finish, exchange, slot, use, return_recv_hook,
                                                               "low_latency_dispatch")

    def _dispatch_push(self, areas: List[torch.Tensor], x: torch.Tensor, topk_idx: torch.Tensor, t_max: int,
                       num_experts: int, use_fp8: bool, round_scale: bool, use_ue8m0: bool, recv_x_out,
                       recv_count: torch.Tensor, handle: tuple, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                       dispatch_wait_recv_cost_stats: Optional[torch.Tensor], return_recv_hook: bool, slot: int,
                       use: int):
        """`dispatch` on the push path (module docstring): each (token, k) row goes straight from this
        rank's ``x`` into the receiver's ``recv_x`` at its final place; the same outputs as `dispatch`."""
        comm = self.comm
        size, rank = comm.size, comm.rank
        num_tokens, hidden = x.shape
        num_topk = topk_idx.size(1)
        num_local = num_experts // size
        num_rows = size * t_max
        num_scales = hidden // GROUP_SIZE
        slot_rows = num_local * num_rows
        row_bytes = hidden if use_fp8 else 2 * hidden
        src_info, layout_range = handle[0], handle[1]

        if _overlaps(x, areas[rank]):  # e.g. a slice of a recv_x of this slot: the peers will overwrite it
            x = x.clone()
        flat_topk = topk_idx.reshape(-1).to(torch.int64)
        # Pairs per expert: ids are >= -1 (Buffer checked), so bin 0 counts the -1 slots and is dropped.
        my_counts = torch.bincount(flat_topk + 1, minlength=num_experts + 1)[1:]
        count_list = my_counts.tolist()
        overflow = sum(1 for c in count_list if c > t_max)

        words = ((_H_TMAX, t_max), (_H_HIDDEN, hidden), (_H_EXPERTS, num_experts), (_H_TOPK, num_topk),
                 (_H_FP8, use_fp8), (_H_ROUND, round_scale), (_H_UE8M0, use_ue8m0), (_H_OVERFLOW, overflow),
                 (_H_PUSH, 1))
        start_ns = time.perf_counter_ns()
        table, peers = self._gather_header(self._header(_KIND_DISPATCH, words, [0] * size, extra=count_list),
                                           list(range(size)), False, "low_latency_dispatch (header exchange)")
        self._check_dispatch_header(table, peers, t_max)
        counts = table[:, _HEADER_WORDS + 2 * size:]              # [R, E] pairs of each rank per expert
        begins = _exclusive_cumsum(counts, dim=0)                 # where each rank's rows start in a block
        header_ns = time.perf_counter_ns() - start_ns

        # Write: expert e's rows of this rank go to rank e // L, block e % L, rows [begin, begin + count).
        if use_fp8:
            x_fp8, scale_inv = per_token_cast_to_fp8(x, round_scale)
            payload = x_fp8.view(torch.uint8)
        else:
            payload, scale_inv = x.contiguous(), None
        rows = [a[:slot_rows * row_bytes].view(payload.dtype).view(num_local, num_rows, -1) for a in areas]
        info_at = slot_rows * row_bytes
        infos = [a[info_at:info_at + slot_rows * 4].view(torch.int32) for a in areas]
        scale_at = info_at + slot_rows * 4
        stages = [a[scale_at:scale_at + slot_rows * num_scales * 4].view(torch.float32).view(slot_rows, num_scales)
                  for a in areas] if use_fp8 else None
        my_begin = begins[rank]
        lib = _native.library()
        if lib is not None:  # the same writes in one C call (deep_ep._native)
            _native.ll_dispatch_place(lib, topk_idx, num_experts, num_local, num_rows, my_begin, payload,
                                      scale_inv.contiguous() if use_fp8 else None,
                                      [r.view(slot_rows, -1) for r in rows], infos, stages)
        else:
            # The valid (token, k) pairs sorted by expert, stable: within an expert, (token, k) order.
            pair = (flat_topk >= 0).nonzero().squeeze(1)          # (token, k) row-major
            expert_sorted, order = torch.sort(flat_topk.index_select(0, pair), stable=True)
            token_sorted = torch.div(pair.index_select(0, order), num_topk, rounding_mode="floor")
            starts = _exclusive_cumsum(my_counts)
            flat = ((expert_sorted % num_local) * num_rows + my_begin.index_select(0, expert_sorted)
                    + torch.arange(expert_sorted.numel()) - starts.index_select(0, expert_sorted))
            self._push_rows(payload, token_sorted, token_sorted.to(torch.int32), scale_inv, flat, my_counts,
                            my_begin, rows, infos, stages, num_local, num_rows)
        if int(counts.sum()):  # else nothing moved anywhere (every rank knows it from the table)
            wait_start = time.perf_counter_ns()
            comm.fence_round("low_latency_dispatch (data exchange)")
            header_ns += time.perf_counter_ns() - wait_start

        def finish() -> None:
            self._unpack_dispatch_push(counts, begins, infos[rank], stages[rank] if use_fp8 else None, use_ue8m0,
                                       recv_x_out, recv_count, src_info, layout_range)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.dtype))
            if dispatch_wait_recv_cost_stats is not None:
                local = counts[:, rank * num_local:(rank + 1) * num_local]
                self._add_wait(dispatch_wait_recv_cost_stats, local.sum(dim=1).tolist(), header_ns)

        return recv_x_out, recv_count, handle, self._make_hook(finish, _Exchange(), slot, use, return_recv_hook,
                                                               "low_latency_dispatch")

    @staticmethod
    def _push_rows(payload: torch.Tensor, token_sorted: torch.Tensor, token32: torch.Tensor,
                   scale_inv: Optional[torch.Tensor], flat: torch.Tensor, my_counts: torch.Tensor,
                   my_begin: torch.Tensor, rows: List[torch.Tensor], infos: List[torch.Tensor],
                   stages: Optional[List[torch.Tensor]], num_local: int, num_rows: int) -> None:
        """The push dispatch's writes with torch operations (without the native helpers): expert e's rows
        of this rank into rank e // L's block e % L from row `my_begin[e]` on, their token indices into
        the receivers' `infos` and their scales into `stages` at the same flat rows `flat`."""
        size = len(rows)
        count_list, begin_list = my_counts.tolist(), my_begin.tolist()
        sources = token_sorted.split(count_list)  # the tokens of each expert (views, one call)
        for dst in range(size):
            lo, hi = dst * num_local, (dst + 1) * num_local
            if not any(count_list[lo:hi]):
                continue
            # Rank dst's receive slot cut into [gap, this rank's rows of expert j, gap] per local expert j.
            cuts = []
            for count, begin in zip(count_list[lo:hi], begin_list[lo:hi]):
                cuts += (begin, count, num_rows - begin - count)
            targets = rows[dst].view(num_local * num_rows, -1).split(cuts)
            for j in range(num_local):
                if count_list[lo + j]:
                    torch.index_select(payload, 0, sources[lo + j], out=targets[3 * j + 1])
        per_dest = my_counts.view(size, num_local).sum(dim=1).tolist()
        at = 0
        for dst, count in enumerate(per_dest):
            if count:
                index = flat[at:at + count]
                infos[dst].index_copy_(0, index, token32[at:at + count])
                if stages is not None:
                    stages[dst].index_copy_(0, index, scale_inv.index_select(0, token_sorted[at:at + count]))
                at += count

    def _unpack_dispatch_push(self, counts: torch.Tensor, begins: torch.Tensor, info: torch.Tensor,
                              stage: Optional[torch.Tensor], use_ue8m0: bool, recv_x_out, recv_count: torch.Tensor,
                              src_info: torch.Tensor, layout_range: torch.Tensor) -> None:
        """Push path: the rows are in place already; fill the counts, the handle and the FP8 scales from
        the header table (`counts`, `begins`: ``[R, E]``) and the receive slot (`info`, `stage`)."""
        rank = self.comm.rank
        num_local, num_rows = src_info.shape
        lib = _native.library()
        if lib is not None:  # the same in one C call (deep_ep._native)
            _native.ll_dispatch_unpack(lib, counts, begins, rank, info, recv_count, layout_range, src_info)
        else:
            local = counts[:, rank * num_local:(rank + 1) * num_local]    # [R, L] rows from each source
            local_begin = begins[:, rank * num_local:(rank + 1) * num_local]
            per_expert = local.sum(dim=0)
            recv_count.copy_(per_expert.to(torch.int32))
            layout_range.copy_((local_begin.t() << 32) | local.t())
            filled = torch.arange(num_rows).unsqueeze(0) < per_expert.unsqueeze(1)
            src_info.copy_(torch.where(filled, info.view(num_local, num_rows), src_info))
        if stage is not None:
            recv_x_out[1].copy_((pack_ue8m0(stage) if use_ue8m0 else stage).view(num_local, num_rows, -1))

    def _unpack_dispatch(self, recv_buf: torch.Tensor, recv_counts: List[int], num_topk: int, hidden: int,
                         num_local: int, num_rows: int, use_fp8: bool, use_ue8m0: bool, recv_x: torch.Tensor,
                         scales: Optional[torch.Tensor], recv_count: torch.Tensor, src_info: torch.Tensor,
                         layout_range: torch.Tensor) -> None:
        """Expand received messages to (token, k) rows of the local experts, in the documented order."""
        size, rank = self.comm.size, self.comm.rank
        device = recv_buf.device
        topk_end = _SRC_BYTES + _TOPK_ID_BYTES * num_topk
        src_token = _from_bytes(recv_buf, 0, _SRC_BYTES, torch.int32).squeeze(1)
        topk = _from_bytes(recv_buf, _SRC_BYTES, topk_end, torch.int32).to(torch.int64)
        msg_source = torch.repeat_interleave(torch.arange(size, device=device),
                                             torch.tensor(recv_counts, dtype=torch.int64, device=device))
        local = (topk >= rank * num_local) & (topk < (rank + 1) * num_local)
        # nonzero() walks (message, k) row-major = (source, token, k) order; a stable sort by expert keeps it.
        pair_msg, pair_k = local.nonzero(as_tuple=True)
        pair_expert = topk[pair_msg, pair_k] - rank * num_local
        order = torch.sort(pair_expert, stable=True).indices
        expert_sorted = pair_expert[order]
        msg_sorted = pair_msg[order]
        per_expert = torch.bincount(pair_expert, minlength=num_local)
        position = torch.arange(order.numel(), device=device) - _exclusive_cumsum(per_expert)[expert_sorted]
        flat_row = expert_sorted * num_rows + position

        payload_begin = topk_end
        # Expert j's rows are recv_x[j, :count_j] in sorted order: one index_select per expert straight
        # from the received bytes into the output.
        row_bytes = hidden if use_fp8 else 2 * hidden
        payload = recv_buf[:, payload_begin:payload_begin + row_bytes]
        out_bytes = recv_x.view(torch.uint8).view(num_local, num_rows, row_bytes)
        start = 0
        for j, count in enumerate(per_expert.tolist()):
            if count:
                torch.index_select(payload, 0, msg_sorted[start:start + count], out=out_bytes[j, :count])
            start += count
        if use_fp8:
            scale_begin = payload_begin + hidden
            scale_inv = recv_buf[:, scale_begin:scale_begin + 4 * (hidden // GROUP_SIZE)].index_select(
                0, msg_sorted).view(torch.float32)
            if use_ue8m0:
                scale_inv = pack_ue8m0(scale_inv)
            scales[expert_sorted, position] = scale_inv
        src_info.view(-1)[flat_row] = src_token.index_select(0, msg_sorted)
        recv_count.copy_(per_expert.to(torch.int32))
        block = torch.bincount(pair_expert * size + msg_source[pair_msg], minlength=num_local * size)
        block = block.view(num_local, size)
        layout_range.copy_((_exclusive_cumsum(block, dim=1) << 32) | block)

    # ------------------------------------------------------------------------------------------
    # Combine

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                use_logfmt: bool, zero_copy: bool, return_recv_hook: bool, out: Optional[torch.Tensor],
                combine_wait_recv_cost_stats: Optional[torch.Tensor]):
        """Return expert outputs to the tokens' owners and reduce them with the top-k weights.

        ``combined_x[t] = bf16(sum_k fp32(topk_weights[t, k]) * fp32(y_k))`` over ``k`` ascending (one
        float32 multiply, then one float32 add, per term), skipping ``topk_idx == -1`` and experts of
        masked ranks. With ``use_logfmt`` each row is rounded through LogFMT-10 on the sending rank
        (`deep_ep.quant.logfmt10_round`) and then travels as BF16: the numbers are exactly those of a
        10-bit transfer, the bytes on the wire are not.

        Args:
            x: ``[E/R, R*T_max, H]`` bf16 in the dispatch layout; with ``zero_copy`` the rows are read
                from the RDMA buffer's combine send area of the slot this call uses instead.
            topk_idx, topk_weights: ``[T, K]`` this rank's original routing (int64, float32).
            handle: the dispatch's handle.
            out: optional ``[T, H]`` bf16 written in place and returned.
            combine_wait_recv_cost_stats: optional int64 ``[R]``; wait nanoseconds are added for every
                rank that sent rows.

        Returns:
            ``(combined_x [T, H] bf16, hook or None)``.
        """
        comm = self.comm
        size, rank = comm.size, comm.rank
        src_info, layout_range, t_max, hidden, num_experts = handle
        num_local = num_experts // size
        num_rows = size * t_max
        device = topk_idx.device
        num_tokens, num_topk = topk_idx.shape

        slot, use = self._begin_call()
        participating, peers, use_p2p = self._route()
        rank_ok = self._rank_ok(participating, use_p2p, device)
        combined = out if out is not None else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)

        if not participating:
            combined.zero_()
            return combined, (lambda: None) if return_recv_hook else None

        # Sender side: the rows of every (local expert, source) block, grouped by source, experts ascending.
        data = self._combine_send_view(slot, t_max, hidden, num_experts, device) if zero_copy else x

        def rows_src_of(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(num_local * num_rows, hidden)
        # Push path: the rows go straight into the owners' receive slots (at most E*T_max rows per rank).
        push = self._push_areas(use_p2p, device, LowLatencyLayout(t_max, hidden, num_experts), slot,
                                num_experts * t_max * 2 * hidden)
        lib = _native.library() if device.type == "cpu" else None
        # Native push path: the sender's block walk and the owner's arrival order in C (deep_ep._native).
        fast = push is not None and lib is not None and not use_logfmt and not _overlaps(data, push[rank])
        if fast:
            send_counts = (layout_range.to(torch.int64) & 0xFFFFFFFF).sum(dim=0).tolist()
            row_of, expect_counts = _native.ll_combine_row_of(lib, topk_idx, num_experts, num_local, size)
        else:
            ranges = layout_range.to(device)
            block_count = ranges & 0xFFFFFFFF
            block_begin = ranges >> 32
            if rank_ok is not None:
                block_count = block_count * rank_ok.to(torch.int64).unsqueeze(0)
            count_by_source = block_count.t().reshape(-1)
            begin_by_source = (block_begin + torch.arange(num_local, device=device).unsqueeze(1) * num_rows).t().reshape(-1)
            num_send = int(count_by_source.sum())
            send_rows = (torch.repeat_interleave(begin_by_source, count_by_source)
                         + torch.arange(num_send, device=device)
                         - torch.repeat_interleave(_exclusive_cumsum(count_by_source), count_by_source))
            send_counts = block_count.sum(dim=0).tolist()

            # Receiver side: this rank's valid (token, k) pairs, sorted by expert (stable) = arrival order.
            topk = topk_idx.to(torch.int64)
            valid = topk >= 0
            owner = torch.div(topk, num_local, rounding_mode="floor")
            if rank_ok is not None:
                valid &= rank_ok[owner.clamp(min=0)]
            pair_token, pair_k = valid.nonzero(as_tuple=True)
            pair_expert = topk[pair_token, pair_k]
            pair_owner = torch.div(pair_expert, num_local, rounding_mode="floor")
            order = torch.sort(pair_expert, stable=True).indices
            expect_counts = torch.bincount(pair_owner, minlength=size).tolist()
        words = ((_H_TMAX, t_max), (_H_HIDDEN, hidden), (_H_EXPERTS, num_experts), (_H_PUSH, push is not None))
        early = None
        if push is not None and (use_logfmt or _overlaps(data, push[rank])):
            # The rows are taken now, before the peers may write into this slot: `x` may be the recv_x of
            # a dispatch two calls back, which lives in this very slot (DeepEP's kernels would read it
            # half overwritten; here it stays right, at the cost of the extra copy).
            early = rows_src_of(data).index_select(0, send_rows)
            if use_logfmt:
                early = logfmt10_round(early)
        start_ns = time.perf_counter_ns()
        table, answered = self._gather_header(self._header(_KIND_COMBINE, words, send_counts, expect_counts), peers,
                                              use_p2p, "low_latency_combine (header exchange)")
        # Shrink mode: peers found gone now are masked; they get nothing and their experts are skipped.
        gone_before = [p for p in peers if p not in answered]
        peers = answered
        header_ns = time.perf_counter_ns() - start_ns
        self._check_signatures(table, peers, _KIND_COMBINE, _COMBINE_SIGNATURE)
        sent = table[:, _HEADER_WORDS:_HEADER_WORDS + size]
        expected = table[:, _HEADER_WORDS + size:]
        peer_index = torch.tensor(peers, dtype=torch.int64)
        sub_sent = sent[peer_index][:, peer_index]
        sub_expected = expected[peer_index][:, peer_index].t()
        if not torch.equal(sub_sent, sub_expected):
            bad = (sub_sent != sub_expected).nonzero().tolist()
            src, dst = peers[bad[0][0]], peers[bad[0][1]]
            raise _agree.coordinated(RuntimeError(
                f"deep_ep.Buffer.low_latency_combine: `topk_idx`/`handle` do not match the dispatch: rank {src} "
                f"returns {int(sent[src, dst])} rows to rank {dst}, whose `topk_idx` expects "
                f"{int(expected[dst, src])}. Pass the handle of the dispatch of these very tokens and the same "
                f"`topk_idx` (and keep the shrink mask unchanged between them, or identical on every rank)"))
        recv_counts = sent[:, rank].tolist()
        # The rows to send, gathered straight into the shared-memory send area when there is one (after
        # the header exchange, which used the area).
        rows_src = rows_src_of(data)
        if push is not None:
            # Each owner receives the rows of the lower ranks first: this rank's rows for owner d start
            # after sum(sent[:rank, d]) rows of its receive slot.
            slots = [a.view(torch.bfloat16).view(-1, hidden) for a in push]
            offsets = _exclusive_cumsum(sent, dim=0)[rank].tolist()
            if fast:
                _native.ll_combine_push(lib, layout_range, num_rows, offsets, rows_src, slots)
            at = 0
            for dst, count in enumerate(send_counts if not fast else []):
                if count:
                    target = slots[dst][offsets[dst]:offsets[dst] + count]
                    if early is not None:
                        target.copy_(early[at:at + count])
                    else:
                        torch.index_select(rows_src, 0, send_rows[at:at + count], out=target)
                    at += count
            if int(sent.sum()):
                comm.fence_round("low_latency_combine (data exchange)")
            recv_buf, exchange = slots[rank][:sum(recv_counts)], _Exchange()
        else:
            if use_logfmt:
                send_buf = logfmt10_round(rows_src.index_select(0, send_rows))
            else:
                send_buf = self._send_area(slot, "send_c", (num_send, hidden), torch.bfloat16, device, use_p2p)
                torch.index_select(rows_src, 0, send_rows, out=send_buf)
            recv_buf, exchange = self._exchange_rows(send_buf, send_counts, recv_counts, peers, use_p2p,
                                                     int(sent.sum()) == 0, "low_latency_combine (data exchange)",
                                                     slot)
        weights = topk_weights.to(torch.float32)

        if fast:
            def finish() -> None:
                if combined.stride(1) == 1:
                    _native.ll_reduce_bf16(lib, recv_buf, row_of, weights, combined)
                else:
                    row_token, row_k = (row_of >= 0).nonzero(as_tuple=True)
                    self._reduce(recv_buf, row_token, row_k, row_of[row_token, row_k], weights, num_tokens, num_topk,
                                 hidden, out=combined)
                if combine_wait_recv_cost_stats is not None:
                    self._add_wait(combine_wait_recv_cost_stats, recv_counts, header_ns)

            return combined, self._make_hook(finish, exchange, slot, use, return_recv_hook, "low_latency_combine")

        def finish() -> None:
            wait_start = time.perf_counter_ns()
            gone = exchange.wait()
            waited_ns = header_ns + time.perf_counter_ns() - wait_start
            counts = [0 if p in gone else c for p, c in enumerate(recv_counts)]
            # Arrival order = pairs sorted by expert; pairs whose owner is gone (shrink mode) are skipped.
            row_token, row_k, row_owner = pair_token[order], pair_k[order], pair_owner[order]
            if gone_before:  # no rows were expected from them
                keep = ~torch.isin(row_owner, torch.tensor(gone_before, dtype=torch.int64, device=device))
                row_token, row_k, row_owner = row_token[keep], row_k[keep], row_owner[keep]
            row = torch.arange(row_token.numel(), device=device)
            if gone:  # their rows were expected but never arrived
                keep = ~torch.isin(row_owner, torch.tensor(gone, dtype=torch.int64, device=device))
                row_token, row_k, row = row_token[keep], row_k[keep], row[keep]
            self._reduce(recv_buf, row_token, row_k, row, weights, num_tokens, num_topk, hidden, out=combined)
            if combine_wait_recv_cost_stats is not None:
                self._add_wait(combine_wait_recv_cost_stats, counts, waited_ns)

        return combined, self._make_hook(finish, exchange, slot, use, return_recv_hook, "low_latency_combine")

    # Tokens per block of the reduce: the float32 accumulator and product of a block (2 x 256 KiB at
    # hidden 2048) stay in cache while the top-k terms are added (measured ~1.6x faster than whole-size
    # [T, H] float32 passes at T=128, H=2048).
    _REDUCE_BLOCK_BYTES = 1 << 18

    @staticmethod
    def _reduce(recv: torch.Tensor, row_token: torch.Tensor, row_k: torch.Tensor, row: torch.Tensor,
                weights: torch.Tensor, num_tokens: int, num_topk: int, hidden: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``bf16(sum_k w[t, k] * y[t, k])`` in float32, ``k`` ascending, skipping pairs without a row.

        ``recv[row[i]]`` is the expert output for pair ``(row_token[i], row_k[i])``; the result goes into
        `out` (``[T, H]`` bf16, any strides) when given. Per token the additions
        are exactly ``acc = 0; acc += fp32(w[t, k]) * fp32(y[t, k])`` for each present ``k`` ascending
        (multiply, then add: never a fused multiply-add); the work goes one block of tokens at a time.
        """
        device = recv.device
        if out is None:
            out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)
        if num_tokens == 0:
            return out
        if row.numel() == 0:
            return out.zero_()
        row_of = torch.full((num_tokens, num_topk), -1, dtype=torch.int64, device=device)
        row_of[row_token, row_k] = row
        lib = _native.library() if device.type == "cpu" else None
        if (lib is not None and recv.dtype == torch.bfloat16 and out.stride(1) == 1 and recv.stride(1) == 1
                and (recv.size(0) <= 1 or recv.stride(0) == hidden)):
            _native.ll_reduce_bf16(lib, recv, row_of, weights, out)  # the same loop in C (deep_ep._native)
            return out
        block = max(8, PortableLowLatency._REDUCE_BLOCK_BYTES // max(1, hidden * 4))
        edges = list(range(0, num_tokens, block)) + [num_tokens]
        present = row_of >= 0
        # Per (block, k): every token of the block has a row (the common case: one gather, no masks).
        padded = torch.ones((len(edges) - 1) * block, num_topk, dtype=torch.bool, device=device)
        padded[:num_tokens] = present
        full = padded.view(len(edges) - 1, block, num_topk).all(dim=1).tolist()
        acc_buf = torch.empty((min(block, num_tokens), hidden), dtype=torch.float32, device=device)
        prod_buf = torch.empty_like(acc_buf)
        for i in range(len(edges) - 1):
            t0, t1 = edges[i], edges[i + 1]
            acc, product = acc_buf[:t1 - t0], prod_buf[:t1 - t0]
            acc.zero_()
            for k in range(num_topk):
                rows = row_of[t0:t1, k]
                if full[i][k]:
                    # The bf16 rows are widened inside the multiply (exact), not in a separate pass.
                    torch.mul(recv.index_select(0, rows), weights[t0:t1, k:k + 1], out=product)
                    acc += product
                    continue
                tokens = present[t0:t1, k].nonzero().view(-1)
                if tokens.numel() == 0:
                    continue
                # Only the tokens with a row for this k are touched; each appears once, so index_add_ is
                # acc + product for them.
                part = weights[t0:t1, k:k + 1].index_select(0, tokens) * recv.index_select(0, rows.index_select(0, tokens))
                acc.index_add_(0, tokens, part)
            out[t0:t1].copy_(acc)
        return out

    # ------------------------------------------------------------------------------------------
    # Hooks, stats, buffers

    def _make_hook(self, finish: Callable[[], None], exchange: _Exchange, slot: int, use: int, return_recv_hook: bool,
                   what: str) -> Optional[Callable[[], None]]:
        if not return_recv_hook:
            finish()
            return None
        state = {"done": False, "error": None}

        def hook() -> None:
            """Complete the receive: fills the tensors returned by the call (a second call does nothing)."""
            if state["error"] is not None:
                raise state["error"]
            if state["done"]:
                return
            try:
                if self._slot_uses[slot] != use:
                    try:  # drain the in-flight exchange so that its buffers are released
                        exchange.wait()
                    except Exception:
                        pass
                    self._check_slot(slot, use, what)
                with self.comm.threads:  # the hook's CPU work is capped like the call's
                    finish()
            except Exception as exc:
                state["error"] = exc  # a failed or refused hook keeps failing: its outputs are invalid
                raise
            state["done"] = True

        return hook

    def _add_wait(self, stats: torch.Tensor, recv_counts: List[int], waited_ns: int) -> None:
        sent = torch.tensor([1 if c > 0 else 0 for c in recv_counts], dtype=torch.int64) * int(waited_ns)
        stats.add_(sent.to(device=stats.device, dtype=stats.dtype))

    def _combine_send_view(self, slot: int, t_max: int, hidden: int, num_experts: int,
                           device: Optional[torch.device]) -> torch.Tensor:
        """BF16 ``[E/R, R*T_max, H]`` view, strides ``(R*T_max*M, M, 1)``, of slot `slot`'s send area."""
        size = self.comm.size
        num_local = num_experts // size
        num_rows = size * t_max
        layout = LowLatencyLayout(t_max, hidden, num_experts)
        msg_elems = layout.combine_msg_bytes // 2
        offset = layout.send_offset(slot)
        num_bytes = num_local * num_rows * layout.combine_msg_bytes
        rdma = self.local_buffers.get("rdma", device)
        assert offset + num_bytes <= rdma.numel(), "RDMA buffer smaller than the low-latency layout"
        area = rdma[offset:offset + num_bytes].view(torch.bfloat16).view(num_local, num_rows, msg_elems)
        return area[:, :, :hidden]

    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The zero-copy combine input of the next LL call's slot (see `_combine_send_view`)."""
        src_info, _, t_max, hidden, num_experts = handle
        return self._combine_send_view(self._slot, t_max, hidden, num_experts, src_info.device)

    def clean_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zero the signalling area of both slots, then synchronise the (unmasked) ranks."""
        layout = LowLatencyLayout(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        rdma = self.local_buffers.get("rdma")
        rdma[layout.signaling_offset(0):layout.signaling_offset(0) + 2 * layout.signaling_bytes].zero_()
        participating, peers, use_p2p = self._route()
        if not participating:
            return
        if use_p2p:
            self._p2p_barrier(peers, "clean_low_latency_buffer (barrier)")
        else:
            self.comm.barrier("clean_low_latency_buffer (barrier)")

    # ------------------------------------------------------------------------------------------
    # Shrink mode

    def update_mask(self, rank_to_mask: int, mask: bool) -> None:
        assert self.enable_shrink and 0 <= rank_to_mask < self.comm.size
        self._mask[rank_to_mask] = 1 if mask else 0

    def query_mask(self, mask_status: torch.Tensor) -> None:
        """Write the mask (int32 ``[R]``, 1 = masked) into `mask_status`."""
        assert self.enable_shrink
        mask_status.copy_(self._mask.to(device=mask_status.device, dtype=mask_status.dtype))

    def clean_mask(self) -> None:
        assert self.enable_shrink
        self._mask.zero_()


def _overlaps(t: torch.Tensor, area: torch.Tensor) -> bool:
    """Whether any byte of `t` may lie inside `area` (contiguous; bounds of `t` from its strides)."""
    if t.numel() == 0:
        return False
    lo = t.data_ptr()
    hi = lo + (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    return lo < area.data_ptr() + area.numel() * area.element_size() and area.data_ptr() < hi


def _wire(t: torch.Tensor) -> torch.Tensor:
    """gloo has no float8 types: move such tensors as bytes."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t
