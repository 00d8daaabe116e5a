"""The CUDA engine, normal mode, one NVLink domain: `get_dispatch_layout`, dispatch, cached dispatch and
combine as the kernels of the compiled core (``csrc/``), over CUDA IPC peer memory.

Python owns the tensors and the streams; the core gets raw pointers and the current stream (inside
`deep_ep.Buffer` that is the comm stream, see ``buffer._Launch``). Outputs and handles follow
``docs/semantics.md`` exactly, like `PortableEngine` (same method signatures, plus an optional
``config`` that sets the ring sizes: ``num_max_nvl_chunked_send_tokens`` /
``num_max_nvl_chunked_recv_tokens``).

Choosing this engine is collective: `probe` gathers every rank's local status (core built, CUDA
device, buffer size) and checks that every rank can map every other rank's buffer (same host, and
the same GPU or peer access), so all ranks agree on the engine and on the reason.

Differences from the portable engine that a caller can observe:

* ``num_worst_tokens`` overflow: the dispatch cannot raise without a CPU sync, so the kernels drop the
  rows that do not fit and flag it; the next call on this buffer raises `RuntimeError` on every rank.
* inputs must be on this rank's CUDA device, contiguous (except ``x_scales``).
"""

from __future__ import annotations

import os
import socket
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _core
from .._comm import Communicator
from ..config import Config, get_combine_config, get_dispatch_config
from . import emulated as _emu

__all__ = ["CudaEngine", "probe", "local_status"]

_I32 = torch.int32


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    """A tensor's device address for the core (None -> NULL; empty tensors too, never dereferenced)."""
    if t is None or t.numel() == 0:
        return None
    return t.data_ptr()




def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def local_status(num_nvl_bytes: int) -> Tuple[bool, str, dict]:
    """This rank's half of the engine choice: ``(usable, reason if not, facts for the peers)``."""
    lib = _core.load()
    if lib is None:
        return False, _core.load_error() or "the compiled core is not available", {}
    emulated = _emu.active()
    if not emulated and not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)", {}
    try:
        count = lib.device_count()
    except _core.CoreError as exc:
        return False, f"the core's CUDA runtime sees no device: {exc}", {}
    if count == 0:
        return False, "the core's CUDA runtime sees no device", {}
    if num_nvl_bytes <= 0:
        return False, "num_nvl_bytes is 0: the CUDA engine's intranode kernels need an NVLink buffer", {}
    device = 0 if emulated else torch.cuda.current_device()
    try:
        bus_id = lib.device_pci_bus_id(device=device)
    except _core.CoreError as exc:
        return False, f"cannot query the PCI bus id of cuda:{device}: {exc}", {}
    facts = {"host": socket.gethostname(), "pid": os.getpid(), "device": device, "bus_id": bus_id}
    return True, "", facts


def _reach(facts: List[dict], rank: int) -> Tuple[bool, str]:
    """Can this rank map every other rank's buffer (CUDA IPC or the same process)?"""
    lib = _core.load()
    me = facts[rank]
    for peer, other in enumerate(facts):
        if peer == rank:
            continue
        if other["host"] != me["host"]:
            return False, f"rank {peer} is on host {other['host']}, not {me['host']} (no CUDA IPC across hosts)"
        if other["bus_id"] == me["bus_id"]:
            continue  # same GPU: IPC between processes, or the raw pointer in one process
        try:
            dev = lib.device_by_pci_bus_id(bus_id=other["bus_id"])
        except _core.CoreError:
            return False, f"rank {peer}'s GPU {other['bus_id']} is not visible here (CUDA_VISIBLE_DEVICES)"
        try:
            can = lib.can_access_peer(device=me["device"], peer_device=dev)
        except _core.CoreError:
            can = False
        if not can:
            return False, f"no peer access (NVLink/P2P) from {me['bus_id']} to rank {peer}'s GPU {other['bus_id']}"
    return True, ""


def probe(comm: Communicator, num_ranks_per_node: int, num_nvl_bytes: int) -> Tuple[bool, str, List[dict]]:
    """Collective: whether every rank can run the CUDA engine. ``(ok, reason, facts of every rank)``.

    Every rank gets the same answer. Call it on all ranks of the group (it runs two all-gathers,
    unless the answer follows from the group shape alone, which every rank knows).
    """
    lib = _core.load()
    max_ranks = _core.limits()["max_ranks"] if lib is not None else 8
    if comm.size // num_ranks_per_node > 1:
        return False, "the group spans several nodes (see deep_ep.engines.cuda_internode)", []
    if comm.size > max_ranks:
        return False, f"{comm.size} ranks: the intranode kernels handle at most {max_ranks} per NVLink domain", []
    return probe_peers(comm, num_nvl_bytes)


def probe_peers(comm: Communicator, num_nvl_bytes: int) -> Tuple[bool, str, List[dict]]:
    """Collective: every rank has a usable core and device, and maps every other rank's GPU memory."""
    ok, reason, facts = local_status(num_nvl_bytes)
    statuses = comm.all_gather_object((ok, reason, facts), op="CUDA engine probe")
    for peer, (peer_ok, peer_reason, _) in enumerate(statuses):
        if not peer_ok:
            return False, f"rank {peer}: {peer_reason}", []
    all_facts = [f for _, _, f in statuses]
    reach = comm.all_gather_object(_reach(all_facts, comm.rank), op="CUDA engine probe (peer access)")
    for peer, (peer_ok, peer_reason) in enumerate(reach):
        if not peer_ok:
            return False, f"rank {peer}: {peer_reason}", []
    return True, "all ranks share one host and reach each other's GPU memory (CUDA IPC / NVLink)", all_facts


class CudaEngine:
    """Normal-mode dispatch/combine with the compiled intranode kernels.

    Args:
        comm: the Buffer's communicator (used for the IPC handle exchange and the final barrier).
        num_ranks_per_node: ranks per node (must equal the group size: one NVLink domain).
        num_nvl_bytes: bytes of this rank's NVLink buffer (rings and count exchange live in it).
        timeout_s: bound of every device- and host-side wait (default ``DEEP_EP_TIMEOUT_S`` via comm).
    """

    name = "cuda"

    def __init__(self, comm: Communicator, num_ranks_per_node: int, num_nvl_bytes: int,
                 timeout_s: Optional[float] = None) -> None:
        if num_ranks_per_node != comm.size:
            raise ValueError(f"CudaEngine: one NVLink domain only, got {num_ranks_per_node} ranks per node of "
                             f"{comm.size}")
        self._open(comm, num_nvl_bytes, num_nvl_bytes, timeout_s)

    def _open(self, comm: Communicator, num_nvl_bytes: int, allocation_bytes: int,
              timeout_s: Optional[float], members: Optional[Sequence[int]] = None) -> None:
        """Allocate ``allocation_bytes`` on this rank's GPU (the first ``num_nvl_bytes`` are the NVLink
        buffer `nvl_buffer` shows) and map the allocations of ``members`` (default: every rank; this rank
        must be one of them) here. Collective over the whole group."""
        members = list(range(comm.size)) if members is None else list(members)
        lib = _core.load()
        if lib is None:
            raise _core.CoreError(_core.load_error() or "the compiled core is not available")
        self._lib = lib
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.size
        self.num_nvl_bytes = num_nvl_bytes
        self.emulated = _emu.active()  # CPU tensors, host-synchronous launches (engines/emulated.py)
        self.device = _emu.device(self.emulated)
        self.timeout_s = float(timeout_s if timeout_s is not None else comm.timeout_s)
        self._rt = None
        self._last_worst = 0
        self._rt = lib.runtime_create(rank=members.index(self.rank), num_ranks=len(members), device=self.device.index or 0,
                                      num_nvl_bytes=allocation_bytes, timeout_s=self.timeout_s)
        try:
            handle = lib.runtime_ipc_handle(self._rt)
            ptr = lib.runtime_local_ptr(self._rt)
            self._data_ptr = ptr
            mine = (socket.gethostname(), os.getpid(), ptr, handle)
            everyone = comm.all_gather_object(mine, op="CUDA engine IPC handle exchange")
            everyone = [everyone[r] for r in members]
            handles = b"".join(h for _, _, _, h in everyone)
            ptrs = [p for _, _, p, _ in everyone]
            same = [int(h == mine[0] and pid == mine[1]) for h, pid, _, _ in everyone]
            lib.runtime_open_peers(self._rt, handles=handles, ptrs=ptrs, same_process=same)
            # Nobody launches a kernel that touches a peer before every peer has mapped everything.
            comm.barrier(op="CUDA engine set-up")
        except BaseException:
            try:  # the set-up error is the one to report
                lib.runtime_destroy(self._rt)
            except _core.CoreError:
                pass
            self._rt = None
            raise

    # ------------------------------------------------------------------------------ life cycle
    def destroy(self, collective: bool = True) -> None:
        """Free the buffer. ``collective``: wait for this GPU, then for every rank (a barrier), so that
        no peer kernel still reads or writes this rank's memory."""
        if self._rt is None:
            return
        rt, self._rt = self._rt, None
        if collective:
            self._lib.runtime_synchronize(rt)
            self.comm.barrier(op="CUDA engine destroy")
        self._lib.runtime_destroy(rt)

    def __del__(self) -> None:
        try:
            if getattr(self, "_rt", None) is not None:
                self._lib.runtime_destroy(self._rt)
        except Exception:
            pass

    def nvl_buffer(self) -> torch.Tensor:
        """This rank's NVLink data region as a 1-D uint8 CUDA tensor (`Buffer.get_local_buffer_tensor`).
        The kernels use it as scratch: its contents change with every dispatch and combine."""
        self._alive()
        owner = self
        if self.emulated:
            return _emu.host_bytes(self._data_ptr, self.num_nvl_bytes, owner)

        class _View:  # __cuda_array_interface__ keeps `owner` (and so the allocation) alive
            __cuda_array_interface__ = {"shape": (self.num_nvl_bytes,), "typestr": "|u1",
                                        "data": (self._data_ptr, False), "version": 3, "strides": None}
            engine = owner

        return torch.as_tensor(_View(), device=self.device)

    # ---------------------------------------------------------------------------------- helpers
    def _stream(self) -> int:
        return _emu.stream(self.emulated)

    def _alive(self) -> None:
        if self._rt is None:
            raise RuntimeError("deep_ep CUDA engine: the buffer was destroyed")

    def _note_worst_notify(self, num_worst_tokens: int) -> None:
        """After a num_worst_tokens notify: remember it, and (outside CUDA-graph capture) an event, so that
        the next call waits for the notify before reading its overflow flag. Every rank's notify sees
        the same counts, so every rank then raises alike; without the wait a rank whose notify had not
        run yet would go on into a collective its peers left."""
        self._last_worst = num_worst_tokens
        if not self.emulated and not torch.cuda.is_current_stream_capturing():
            self._worst_event = torch.cuda.Event()
            self._worst_event.record()

    def _check_worst_overflow(self) -> None:
        """Raise for an earlier num_worst_tokens overflow (the kernels flagged it; see the module doc)."""
        event = getattr(self, "_worst_event", None)
        if event is not None and not self.emulated and not torch.cuda.is_current_stream_capturing():
            event.synchronize()
            self._worst_event = None
        value = self._lib.runtime_take_worst_overflow(self._rt)
        if value > 0:
            raise RuntimeError(
                f"deep_ep.Buffer.dispatch: an earlier dispatch with num_worst_tokens={self._last_worst} overflowed: a "
                f"rank received {value} tokens, so rows were dropped and its outputs are incomplete; raise "
                f"`num_worst_tokens` to at least {value}")

    def _enter(self, *tensors: Optional[torch.Tensor]) -> None:
        self._alive()
        self._check_worst_overflow()
        for t in tensors:
            if t is not None and t.device != self.device:
                raise ValueError(f"deep_ep CUDA engine: tensors must be on {self.device} (this Buffer's device), got "
                                 f"{t.device}")

    # ------------------------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        self._enter(topk_idx)
        topk_idx = topk_idx.contiguous()
        num_tokens, num_topk = topk_idx.shape
        num_tokens_per_rank = torch.empty(self.num_ranks, dtype=_I32, device=self.device)
        num_tokens_per_expert = torch.empty(num_experts, dtype=_I32, device=self.device)
        is_token_in_rank = torch.empty((num_tokens, self.num_ranks), dtype=torch.bool, device=self.device)
        self._lib.get_dispatch_layout(
            self.device.index or 0, self._stream(), _ptr(num_tokens_per_rank), _ptr(num_tokens_per_expert), _ptr(is_token_in_rank), _ptr(topk_idx),
            num_tokens, num_topk, num_experts, self.num_ranks)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank

    # ---------------------------------------------------------------------------------- dispatch
    def _ring_config(self, config: Optional[Config], combine: bool) -> Tuple[int, int]:
        if config is None:
            config = (get_combine_config if combine else get_dispatch_config)(self.num_ranks, 2)
        return config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], is_token_in_rank: torch.Tensor,
                 num_tokens_per_expert: torch.Tensor, expert_alignment: int, num_worst_tokens: int,
                 num_channels: int, config: Optional[Config] = None):
        self._enter(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert)
        R, lib = self.num_ranks, self._lib
        C = num_channels
        send_tokens, slots = self._ring_config(config, combine=False)
        x = x.contiguous()
        is_token_in_rank = is_token_in_rank.contiguous()
        num_tokens, hidden = x.shape
        row_bytes = hidden * x.element_size()
        num_experts = num_tokens_per_expert.numel()
        num_local_experts = num_experts // R
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        num_scales = x_scales.size(1) if x_scales is not None else 0
        if topk_idx is not None:
            topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()
        rank_prefix_matrix = torch.empty((R, R), dtype=_I32, device=self.device)
        channel_prefix_matrix = torch.empty((R, C), dtype=_I32, device=self.device)
        recv_channel_prefix_matrix = torch.empty((R, C), dtype=_I32, device=self.device)
        stream = self._stream()
        lib.intranode_notify_dispatch(
            self._rt, stream, _ptr(rank_prefix_matrix), _ptr(channel_prefix_matrix), _ptr(recv_channel_prefix_matrix),
            _ptr(num_tokens_per_expert), _ptr(is_token_in_rank), num_tokens, num_experts, C,
            slots, row_bytes, num_topk, num_scales, expert_alignment, num_worst_tokens)

        if num_worst_tokens > 0:
            self._note_worst_notify(num_worst_tokens)
            num_rows, count_list = num_worst_tokens, []
        else:
            arrived, values = lib.runtime_wait_recv_counters(self._rt, stream, num_local_experts)
            if not arrived:
                raise RuntimeError(
                    f"deep_ep.Buffer.dispatch: timeout ({self.timeout_s:g} s, DEEP_EP_TIMEOUT_S) on rank {self.rank} "
                    f"waiting for the receive counts of the notify kernel: received tokens = {values[0]}, per local "
                    f"expert = {values[1:]} (-1 = not written): a peer did not enter the dispatch")
            num_rows, count_list = values[0], values[1:]

        recv_x = torch.empty((num_rows, hidden), dtype=x.dtype, device=self.device)
        recv_scales = None
        if x_scales is not None:
            recv_scales = torch.empty((num_rows, num_scales), dtype=x_scales.dtype, device=self.device)
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = torch.empty((num_rows, num_topk), dtype=torch.int64, device=self.device)
            recv_topk_weights = torch.empty((num_rows, num_topk), dtype=torch.float32, device=self.device)
        recv_src_idx = torch.empty(num_rows, dtype=_I32, device=self.device)
        send_head = torch.empty((num_tokens, R), dtype=_I32, device=self.device)
        scale_strides = (x_scales.stride(0), x_scales.stride(1)) if x_scales is not None else (0, 0)
        lib.intranode_dispatch(
            self._rt, stream, _ptr(recv_x), _ptr(recv_scales), _ptr(recv_topk_idx), _ptr(recv_topk_weights),
            _ptr(recv_src_idx), _ptr(send_head), _ptr(x), _ptr(x_scales), scale_strides[0], scale_strides[1],
            _ptr(topk_idx), _ptr(topk_weights), _ptr(is_token_in_rank), _ptr(rank_prefix_matrix),
            _ptr(recv_channel_prefix_matrix), num_tokens, num_rows, int(num_worst_tokens > 0), num_experts, C, slots,
            send_tokens, row_bytes, num_topk, num_scales, 0)

        handle = (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank, send_head)
        recv_x_out = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv_x_out, recv_topk_idx, recv_topk_weights, count_list, handle

    # --------------------------------------------------------------------------- cached dispatch
    def cached_dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: tuple,
                        config: Optional[Config] = None):
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, _ = handle
        self._enter(x, x_scales, rank_prefix_matrix, is_token_in_rank)
        send_tokens, slots = self._ring_config(config, combine=False)
        x = x.contiguous()
        num_tokens, hidden = x.shape
        row_bytes = hidden * x.element_size()
        C = channel_prefix_matrix.size(1)
        num_rows = recv_src_idx.size(0)
        num_scales = x_scales.size(1) if x_scales is not None else 0
        recv_x = torch.empty((num_rows, hidden), dtype=x.dtype, device=self.device)
        recv_scales = None
        if x_scales is not None:
            recv_scales = torch.empty((num_rows, num_scales), dtype=x_scales.dtype, device=self.device)
        scale_strides = (x_scales.stride(0), x_scales.stride(1)) if x_scales is not None else (0, 0)
        # The row count is known only on the device (no CPU sync): rows past it are zero-filled there.
        self._lib.intranode_dispatch(
            self._rt, self._stream(), _ptr(recv_x), _ptr(recv_scales), None, None, None, None, _ptr(x), _ptr(x_scales),
            scale_strides[0], scale_strides[1], None, None, _ptr(is_token_in_rank.contiguous()),
            _ptr(rank_prefix_matrix.contiguous()), _ptr(recv_channel_prefix_matrix.contiguous()), num_tokens, num_rows,
            1, 0, C, slots, send_tokens, row_bytes, 0, num_scales, 1)
        return (recv_x, recv_scales) if x_scales is not None else recv_x

    # ----------------------------------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor],
                bias: Sequence[torch.Tensor], config: Optional[Config] = None):
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, _, is_token_in_rank, send_head = handle
        self._enter(x, topk_weights, send_head, *bias)
        send_tokens, slots = self._ring_config(config, combine=True)
        x = x.contiguous()
        hidden = x.size(1)
        num_tokens = is_token_in_rank.size(0)
        C = channel_prefix_matrix.size(1)
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        if topk_weights is not None:
            topk_weights = topk_weights.contiguous()
        biases = [b.contiguous() for b in bias] + [None, None]
        combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self.device)
        combined_w = None
        if topk_weights is not None:
            combined_w = torch.empty((num_tokens, num_topk), dtype=torch.float32, device=self.device)
        self._lib.intranode_combine(
            self._rt, self._stream(), _ptr(combined_x), _ptr(combined_w), _ptr(x), _ptr(topk_weights), _ptr(biases[0]),
            _ptr(biases[1]), _ptr(rank_prefix_matrix.contiguous()), _ptr(recv_channel_prefix_matrix.contiguous()),
            _ptr(send_head.contiguous()), num_tokens, C, slots, send_tokens, hidden * x.element_size(), num_topk)
        return combined_x, combined_w
