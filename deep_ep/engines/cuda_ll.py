"""The CUDA engine, low-latency mode: `low_latency_dispatch` / `low_latency_combine` as the kernels of
the compiled core (``csrc/kernels/low_latency*.cu``), over one of two transports:

* ``peer``: CUDA IPC peer memory (every rank on one host, each GPU reaching the others; up to 8 ranks);
  the LL buffer is a `Runtime` allocation of ``num_rdma_bytes`` mapped by every rank;
* ``nvshmem``: NVSHMEM's public device API (any NVSHMEM transport); the LL buffer is a symmetric
  ``nvshmem_align`` allocation; ``libdeep_ep_nvshmem.so`` must be built and NVSHMEM loadable.

`CudaLowLatency` has exactly the interface of `PortableLowLatency` (``deep_ep/engines/portable_ll.py``)
and the same outputs (docs/semantics.md). Differences a caller can observe:

* Nothing synchronises with the CPU: every call can be captured in a CUDA graph. A graph bakes in the
  buffer slot of the captured call, so capture calls in pairs (dispatch + combine) as DeepEP users do;
  replays stay correct because signal words carry a per-slot epoch kept on the device. Exceptions: the
  first call, and a call whose (num_max_dispatch_tokens_per_rank, hidden, num_experts) changes the buffer
  layout, zero both signalling areas on every rank (two barriers, a host synchronisation; not while
  capturing), as `clean_low_latency_buffer` does: old words at the moved offsets could otherwise decode
  as the epoch the new call waits for.
* A rank whose ``topk_idx`` puts more than ``num_max_dispatch_tokens_per_rank`` pairs on one expert
  cannot raise at once (that needs a sync): the extra pairs are dropped, and the next LL call raises
  `RuntimeError` on that rank and on the expert's rank (the count travels in the signal word).
* ``dispatch_wait_recv_cost_stats[s]`` gets, per local expert, the nanoseconds spent waiting for source
  ``s``'s count (summed over local experts); ``combine_wait_recv_cost_stats[d]`` the longest wait for
  one of rank ``d``'s experts. Only ranks that sent rows are charged, as in the portable engine.
* Shrink mode: a rank that does not signal within the timeout is masked on the device (the kernels
  go on without it) instead of trapping; without shrink mode a timeout prints the kernel, rank,
  expert, peer and phase, and traps (the CUDA context is lost, as in the intranode kernels).
* ``low_latency_combine`` with ``zero_copy`` and ``use_logfmt`` rewrites the zero-copy buffer in place.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, List, Optional, Tuple

import torch

from .. import _core, _nvshmem
from . import emulated as _emu
from .._comm import Communicator
from .local_buffers import DoubleBufferSlots

__all__ = ["CudaLowLatency", "probe_ll", "TRANSPORTS"]

TRANSPORTS = ("peer", "nvshmem")
_MAX_TOPK = 16
_MAX_TOKENS = 1024
_WS_HEADER = 32  # DEEP_EP_LL_WS_HEADER


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _transport_request() -> str:
    value = os.environ.get("DEEP_EP_LL_TRANSPORT", "auto").strip().lower() or "auto"
    if value not in ("auto",) + TRANSPORTS:
        raise ValueError(f"DEEP_EP_LL_TRANSPORT must be auto, peer or nvshmem, got {value!r}")
    return value


def _local_status(num_rdma_bytes: int) -> Tuple[bool, str, dict]:
    lib = _core.load()
    if lib is None:
        return False, _core.load_error() or "the compiled core is not available", {}
    emulated = _emu.active()
    if not emulated and not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)", {}
    if num_rdma_bytes <= 0:
        return False, "num_rdma_bytes is 0", {}
    device = 0 if emulated else torch.cuda.current_device()
    try:
        bus_id = lib.device_pci_bus_id(device=device)
    except _core.CoreError as exc:
        return False, f"cannot query the PCI bus id of cuda:{device}: {exc}", {}
    nv = _core.load_nvshmem()
    facts = {"host": socket.gethostname(), "pid": os.getpid(), "device": device, "bus_id": bus_id,
             "nvshmem": nv is not None, "nvshmem_reason": "" if nv is not None else (_core.nvshmem_load_error() or ""),
             "nvshmem_remote": _nvshmem.remote_transport()}
    return True, "", facts


def probe_ll(comm: Communicator, num_rdma_bytes: int, allow_nvlink: bool) -> Tuple[bool, str, str, List[dict]]:
    """Collective: whether every rank can run the CUDA LL engine, and over which transport.

    Returns ``(ok, reason, transport, facts of every rank)``; every rank gets the same answer.
    ``DEEP_EP_LL_TRANSPORT`` (auto / peer / nvshmem) picks the transport; ``auto`` prefers peer memory
    (no NVSHMEM initialisation) when all ranks share a host, reach each other's GPU memory, number at
    most 8 and ``allow_nvlink_for_low_latency_mode`` is True, else NVSHMEM.
    """
    from .cuda import _reach

    request = _transport_request()
    ok, reason, facts = _local_status(num_rdma_bytes)
    statuses = comm.all_gather_object((ok, reason, facts), op="CUDA low-latency engine probe")
    for peer, (peer_ok, peer_reason, _) in enumerate(statuses):
        if not peer_ok:
            return False, f"rank {peer}: {peer_reason}", "", []
    all_facts = [f for _, _, f in statuses]
    lib = _core.load()
    max_peer = _core.limits()["max_ranks"] if lib is not None else 8
    peer_ok, peer_reason = True, ""
    if not allow_nvlink:
        peer_ok, peer_reason = False, "allow_nvlink_for_low_latency_mode=False"
    elif comm.size > max_peer:
        peer_ok, peer_reason = False, f"{comm.size} ranks (peer memory handles at most {max_peer})"
    else:
        reach = comm.all_gather_object(_reach(all_facts, comm.rank), op="CUDA low-latency engine probe (peer access)")
        for peer, (r_ok, r_reason) in enumerate(reach):
            if not r_ok:
                peer_ok, peer_reason = False, f"rank {peer}: {r_reason}"
                break
    nv_missing = [(p, f["nvshmem_reason"]) for p, f in enumerate(all_facts) if not f["nvshmem"]]
    if not nv_missing and len({f["host"] for f in all_facts}) > 1:
        # Between hosts: the transport NVSHMEM will use must carry the kernels' atomics.
        for p, f in enumerate(all_facts):
            name, problem = f["nvshmem_remote"]
            problem = problem or _nvshmem.ll_remote_problem(name)
            if problem:
                nv_missing = [(p, f"the NVSHMEM transport between hosts ({name}) is not usable: {problem}")]
                break
    nv_ok = not nv_missing
    nv_reason = "" if nv_ok else f"rank {nv_missing[0][0]}: {nv_missing[0][1]}"
    if request in ("auto", "peer") and peer_ok:
        why = "forced by DEEP_EP_LL_TRANSPORT=peer: " if request == "peer" else ""
        return True, why + "low-latency kernels over CUDA IPC peer memory (all ranks on one host, GPUs reach each other)", \
            "peer", all_facts
    if request in ("auto", "nvshmem") and nv_ok:
        why = "forced by DEEP_EP_LL_TRANSPORT=nvshmem: " if request == "nvshmem" else \
            f"peer memory not usable ({peer_reason}): "
        return True, why + "low-latency kernels over NVSHMEM", "nvshmem", all_facts
    if request == "peer":
        return False, f"DEEP_EP_LL_TRANSPORT=peer but peer memory is not usable: {peer_reason}", "", []
    if request == "nvshmem":
        return False, f"DEEP_EP_LL_TRANSPORT=nvshmem but NVSHMEM is not usable: {nv_reason}", "", []
    return False, f"neither transport is usable: peer memory ({peer_reason}), NVSHMEM ({nv_reason})", "", []


class _BufferView:
    """A ``__cuda_array_interface__`` over the LL buffer that keeps its owner alive."""

    def __init__(self, ptr: int, nbytes: int, owner) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None}
        self.owner = owner


class CudaLowLatency(DoubleBufferSlots):
    """Low-latency dispatch/combine with the compiled kernels (same interface as `PortableLowLatency`).

    Args:
        comm: the Buffer's communicator.
        num_rdma_bytes: size of the LL buffer (the Buffer checks it against the layout per call).
        enable_shrink: allow masking ranks.
        transport: ``"peer"`` or ``"nvshmem"`` (from `probe_ll`).
        num_qps_per_rank, allow_nvlink, allow_mnnvl: `Buffer` arguments (NVSHMEM environment).
        single_host: every rank on this host (NVSHMEM environment defaults).
        timeout_s: bound of every device-side wait (default: the communicator's).
    """

    name = "cuda"

    def __init__(self, comm: Communicator, num_rdma_bytes: int, enable_shrink: bool, transport: str,
                 num_qps_per_rank: int = 24, allow_nvlink: bool = True, allow_mnnvl: bool = False,
                 single_host: bool = True, timeout_s: Optional[float] = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"CudaLowLatency: unknown transport {transport!r}")
        lib = _core.load()
        if lib is None:
            raise _core.CoreError(_core.load_error() or "the compiled core is not available")
        self._lib = lib
        self.comm = comm
        self.rank, self.num_ranks = comm.rank, comm.size
        self.num_rdma_bytes = num_rdma_bytes
        self.enable_shrink = enable_shrink
        self.transport = transport
        self.emulated = _emu.active()  # CPU tensors, host-synchronous launches (engines/emulated.py)
        self.device = _emu.device(self.emulated)
        self.timeout_s = float(timeout_s if timeout_s is not None else comm.timeout_s)
        self.num_sms = _emu.num_sms(self.emulated, self.device)
        self._rt = None
        self._nv = None
        self._nv_ptr = 0
        self._init_slots()
        self._workspace: Optional[torch.Tensor] = None
        self._workspace_key: Optional[Tuple[int, int]] = None
        self._signal_layout: Optional[Tuple[int, ...]] = None  # offsets of the last call's layout
        self._mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        self._flags = torch.zeros(4, dtype=torch.int32)
        if not self.emulated:
            self._flags = self._flags.pin_memory()
        if transport == "peer":
            self._ptr = self._open_peer()
        else:
            self._ptr = self._open_nvshmem(num_qps_per_rank, allow_nvlink, allow_mnnvl, single_host)
        if self.emulated:
            self._buffer = _emu.host_bytes(self._ptr, num_rdma_bytes, self)
        else:
            self._buffer = torch.as_tensor(_BufferView(self._ptr, num_rdma_bytes, self), device=self.device)

    # ------------------------------------------------------------------------------ set-up
    def _open_peer(self) -> int:
        lib = self._lib
        rt = lib.runtime_create(rank=self.rank, num_ranks=self.num_ranks, device=self.device.index or 0,
                                num_nvl_bytes=self.num_rdma_bytes, timeout_s=self.timeout_s)
        self._rt = rt
        try:
            handle = lib.runtime_ipc_handle(rt)
            ptr = lib.runtime_local_ptr(rt)
            mine = (socket.gethostname(), os.getpid(), ptr, handle)
            everyone = self.comm.all_gather_object(mine, op="CUDA LL engine IPC handle exchange")
            handles = b"".join(h for _, _, _, h in everyone)
            ptrs = [p for _, _, p, _ in everyone]
            same = [int(h == mine[0] and pid == mine[1]) for h, pid, _, _ in everyone]
            lib.runtime_open_peers(rt, handles=handles, ptrs=ptrs, same_process=same)
            self.comm.barrier(op="CUDA LL engine set-up")
        except BaseException:
            try:  # the set-up error is the one to report
                lib.runtime_destroy(rt)
            except _core.CoreError:
                pass
            self._rt = None
            raise
        return ptr

    def _open_nvshmem(self, num_qps_per_rank: int, allow_nvlink: bool, allow_mnnvl: bool, single_host: bool) -> int:
        nv = _core.load_nvshmem()
        if nv is None:
            raise _core.CoreError(_core.nvshmem_load_error() or "libdeep_ep_nvshmem.so is not available")
        self._nv = nv
        _nvshmem.apply_env_defaults(num_qps_per_rank, allow_nvlink, allow_mnnvl, single_host, self.num_rdma_bytes)
        _nvshmem.bootstrap(self.comm, nv, self.device.index or 0)
        ptr = nv.alloc(self.num_rdma_bytes)
        self._nv_ptr = ptr
        return ptr

    def destroy(self, collective: bool = True) -> None:
        """Free the LL buffer (collective: waits for this GPU and every rank first)."""
        if self._rt is not None:
            rt, self._rt = self._rt, None
            if collective:
                self._lib.runtime_synchronize(rt)
                self.comm.barrier(op="CUDA LL engine destroy")
            self._lib.runtime_destroy(rt)
        if self._nv is not None and self._nv_ptr:
            ptr, self._nv_ptr = self._nv_ptr, 0
            if collective:  # nvshmem_free and finalize are collective
                self._nv.free(ptr)
                self._nv.finalize()

    def __del__(self) -> None:
        try:
            if getattr(self, "_rt", None) is not None:
                self._lib.runtime_destroy(self._rt)
        except Exception:
            pass

    def rdma_buffer(self) -> torch.Tensor:
        """The LL buffer as a 1-D uint8 CUDA tensor (`Buffer.get_local_buffer_tensor(use_rdma_buffer=True)`)."""
        return self._buffer

    # ------------------------------------------------------------------------------ helpers
    def _layout(self, t_max: int, hidden: int, num_experts: int) -> List[int]:
        values = self._lib.ll_layout(num_max_tokens=t_max, hidden=hidden, num_experts=num_experts)
        if values[6] > self.num_rdma_bytes:
            raise ValueError(f"deep_ep CUDA LL engine: the layout needs {values[6]} bytes, the buffer has "
                             f"{self.num_rdma_bytes}")
        return values

    def _ensure_workspace(self, t_max: int, num_experts: int) -> torch.Tensor:
        key = (t_max, num_experts)
        if self._workspace_key != key:
            words = self._lib.ll_workspace_words(t_max, num_experts, self.num_ranks)
            if words <= 0:
                raise ValueError(f"deep_ep CUDA LL engine: bad shape (T_max={t_max}, num_experts={num_experts})")
            if self._workspace is not None and self._workspace.numel() >= words:
                ws = self._workspace  # the header (epochs) stays; prepare clears or rewrites the rest per call
            else:
                if not self.emulated and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("deep_ep CUDA LL engine: the first call with a new (num_max_dispatch_tokens_per_rank, "
                                       "num_experts) allocates its workspace; make one such call before capturing")
                ws = torch.zeros(words, dtype=torch.int32, device=self.device)
                if self._workspace is not None:  # keep the epochs: stale signal words must never match
                    ws[:_WS_HEADER].copy_(self._workspace[:_WS_HEADER])
            self._workspace, self._workspace_key = ws, key
        return self._workspace

    def _reset_signals(self, lay: List[int], what: str) -> None:
        """Zero both signalling areas of layout `lay` on every rank (collective; synchronises the host).

        Order: this GPU's work done (every stream: earlier calls may have run on the comm stream), then a
        barrier (no rank's kernels still write into this buffer: a combine signal of an expert this rank
        routed nothing to is never waited for), zero, then a barrier again (every rank zeroed before any
        rank signals into the new areas). A receive hook of an earlier call must have been called before.
        """
        if self._buffer.is_cuda:
            torch.cuda.synchronize(self.device)
        self.comm.barrier(op=f"{what} (before zeroing the signals)")
        self._buffer[lay[0]:lay[2]].zero_()  # both signalling areas (they are adjacent)
        if self._buffer.is_cuda:
            torch.cuda.synchronize(self.device)
        self.comm.barrier(op=f"{what} (signals zeroed)")
        self._signal_layout = tuple(lay[:6])

    def _use_layout(self, lay: List[int]) -> None:
        """Before a call: when its layout differs from the previous call's (or this is the first call),
        zero both signalling areas on every rank. The areas move with num_experts, and words of the old
        layout (an older epoch of the other slot, payload bytes) could decode as the epoch the new call's
        receive waits for. Every rank sees the same sequence of shapes, so all take this path together."""
        if self._signal_layout == tuple(lay[:6]):
            return
        if self._buffer.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("deep_ep CUDA LL engine: the first call with a new (num_max_dispatch_tokens_per_rank, "
                               "hidden, num_experts) resets the buffer's signals (a host synchronisation); make one "
                               "such call before capturing")
        self._reset_signals(lay, "low-latency layout change")

    def _check_flags(self) -> None:
        overflow = int(self._flags[0])
        if overflow > 0:
            self._flags[0] = 0
            raise RuntimeError(
                f"deep_ep.Buffer.low_latency_dispatch: an earlier low-latency dispatch routed {overflow} (token, k) "
                f"pairs from one rank to one expert (seen on rank {self.rank}, as sender or as the expert's rank), more "
                f"than num_max_dispatch_tokens_per_rank allows (a token lists the same expert several times); the "
                f"extra pairs were dropped, so the outputs of that call were incomplete")

    def _call(self, kind: int, slot: int, t_max: int, hidden: int, num_experts: int, num_tokens: int,
              num_topk: int) -> _core.LLCall:
        lay = self._layout(t_max, hidden, num_experts)
        ws = self._ensure_workspace(t_max, num_experts)
        self._use_layout(lay)
        c = _core.LLCall()
        c.kind, c.rank, c.num_ranks, c.slot = kind, self.rank, self.num_ranks, slot
        c.num_tokens, c.num_max_tokens, c.hidden, c.num_experts, c.num_topk = num_tokens, t_max, hidden, num_experts, num_topk
        c.shrink, c.num_sms, c.device = int(self.enable_shrink), self.num_sms, self.device.index or 0
        c.timeout_ns = int(self.timeout_s * 1e9)
        c.buffer = self._ptr
        c.signaling_offset[0], c.signaling_offset[1] = lay[0], lay[1]
        c.send_offset[0], c.send_offset[1] = lay[2], lay[3]
        c.recv_offset[0], c.recv_offset[1] = lay[4], lay[5]
        c.dispatch_msg_bytes, c.combine_msg_bytes = lay[7], lay[8]
        c.workspace, c.mask, c.host_flags = ws.data_ptr(), self._mask.data_ptr(), self._flags.data_ptr()
        return c

    def _launch(self, c: _core.LLCall, phases: int) -> None:
        stream = _emu.stream(self.emulated, self.device)
        if phases & _core.LL_SEND:
            self._lib.ll_prepare(c, stream)
            if self.transport == "peer":
                self._lib.ll_peer_send(self._rt, c, stream)
            else:
                self._nv.ll_send(c, stream)
        if phases & _core.LL_RECV:
            self._lib.ll_receive(c, stream)

    def _finish(self, c: _core.LLCall, slot: int, use: int, return_recv_hook: bool, what: str,
                keep: tuple) -> Optional[Callable[[], None]]:
        if not return_recv_hook:
            self._launch(c, _core.LL_RECV)
            return None
        state = {"done": False}

        def hook() -> None:
            """Launch the receive kernel on the current stream (a second call does nothing)."""
            if state["done"]:
                return
            self._check_slot(slot, use, what)
            self._launch(c, _core.LL_RECV)
            state["done"] = True
            state["keep"] = keep  # inputs the receive kernel reads stay alive until it is enqueued

        hook.keep = keep  # type: ignore[attr-defined]
        return hook

    def _check_device(self, *tensors: Optional[torch.Tensor]) -> None:
        for t in tensors:
            if t is not None and t.device != self.device:
                raise ValueError(f"deep_ep CUDA LL engine: tensors must be on {self.device}, got {t.device}")

    # ------------------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                 num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                 dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
                 use_ue8m0: bool, return_recv_hook: bool):
        """See `PortableLowLatency.dispatch`: same arguments, same outputs."""
        self._check_flags()
        self._check_device(x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)
        t_max, size = num_max_dispatch_tokens_per_rank, self.num_ranks
        num_tokens, hidden = x.shape
        num_topk = topk_idx.size(1)
        if t_max > _MAX_TOKENS or num_topk > _MAX_TOPK:
            raise ValueError(f"deep_ep CUDA LL engine: at most {_MAX_TOKENS} tokens per rank and top-{_MAX_TOPK}")
        if self.transport == "nvshmem":
            _nvshmem.check_qp_depth(t_max)
        num_local = num_experts // size
        num_rows = size * t_max
        num_scales = hidden // 128
        x = x.contiguous()
        topk = topk_idx.to(torch.int64).contiguous()
        slot, use = self._begin_call()
        if use_fp8:
            recv_x = torch.empty((num_local, num_rows, hidden), dtype=torch.float8_e4m3fn, device=self.device)
            if use_ue8m0:
                scales = torch.empty((num_local, (num_scales + 3) // 4, num_rows), dtype=torch.int32,
                                     device=self.device).transpose(1, 2)
            else:
                scales = torch.empty((num_local, num_scales, num_rows), dtype=torch.float32,
                                     device=self.device).transpose(1, 2)
        else:
            recv_x = torch.empty((num_local, num_rows, hidden), dtype=torch.bfloat16, device=self.device)
            scales = None
        recv_count = torch.empty(num_local, dtype=torch.int32, device=self.device)
        src_info = torch.empty((num_local, num_rows), dtype=torch.int32, device=self.device)
        layout_range = torch.empty((num_local, size), dtype=torch.int64, device=self.device)
        c = self._call(_core.LL_DISPATCH, slot, t_max, hidden, num_experts, num_tokens, num_topk)
        c.use_fp8, c.round_scale, c.use_ue8m0 = int(use_fp8), int(round_scale), int(use_ue8m0)
        c.x, c.topk_idx = _ptr(x), _ptr(topk)
        c.recv_x, c.recv_scales = _ptr(recv_x), _ptr(scales)
        c.recv_count, c.src_info, c.layout_range = _ptr(recv_count), _ptr(src_info), _ptr(layout_range)
        c.cumulative_stats = _ptr(cumulative_local_expert_recv_stats)
        c.wait_stats = _ptr(dispatch_wait_recv_cost_stats)
        self._launch(c, _core.LL_SEND)
        hook = self._finish(c, slot, use, return_recv_hook, "low_latency_dispatch",
                            (x, topk, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats))
        handle = (src_info, layout_range, t_max, hidden, num_experts)
        return ((recv_x, scales) if use_fp8 else recv_x), recv_count, handle, hook

    # ------------------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                use_logfmt: bool, zero_copy: bool, return_recv_hook: bool, out: Optional[torch.Tensor],
                combine_wait_recv_cost_stats: Optional[torch.Tensor]):
        """See `PortableLowLatency.combine`: same arguments, same outputs."""
        self._check_flags()
        src_info, layout_range, t_max, hidden, num_experts = handle
        self._check_device(x, topk_idx, topk_weights, out, combine_wait_recv_cost_stats, layout_range)
        num_tokens, num_topk = topk_idx.shape
        if num_topk > _MAX_TOPK:
            raise ValueError(f"deep_ep CUDA LL engine: top-k at most {_MAX_TOPK}")
        topk = topk_idx.to(torch.int64).contiguous()
        weights = topk_weights.to(torch.float32).contiguous()
        data = None if zero_copy else x.contiguous()
        ranges = layout_range.contiguous()
        combined = out if out is not None else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self.device)
        target = combined if combined.is_contiguous() else torch.empty_like(combined, memory_format=torch.contiguous_format)
        slot, use = self._begin_call()
        c = self._call(_core.LL_COMBINE, slot, t_max, hidden, num_experts, num_tokens, num_topk)
        c.use_logfmt, c.zero_copy = int(use_logfmt), int(zero_copy)
        c.x, c.topk_idx, c.topk_weights = _ptr(data), _ptr(topk), _ptr(weights)
        c.layout_range = _ptr(ranges)
        c.wait_stats = _ptr(combine_wait_recv_cost_stats)
        c.combined_x = _ptr(target)
        self._launch(c, _core.LL_SEND)
        keep = (data, topk, weights, ranges, target, combine_wait_recv_cost_stats)
        if target is combined:
            hook = self._finish(c, slot, use, return_recv_hook, "low_latency_combine", keep)
        else:  # a strided `out`: reduce into a contiguous buffer, then copy
            inner = self._finish(c, slot, use, True, "low_latency_combine", keep)

            def copy_back() -> None:
                inner()
                combined.copy_(target)

            if return_recv_hook:
                hook = copy_back
            else:
                copy_back()
                hook = None
        return combined, hook

    # ------------------------------------------------------------------------------ buffers
    def _combine_send_view(self, slot: int, t_max: int, hidden: int, num_experts: int) -> torch.Tensor:
        lay = self._layout(t_max, hidden, num_experts)
        num_local = num_experts // self.num_ranks
        num_rows = self.num_ranks * t_max
        msg_elems = lay[8] // 2
        offset = lay[2 + slot]
        area = self._buffer[offset:offset + num_local * num_rows * lay[8]]
        return area.view(torch.bfloat16).view(num_local, num_rows, msg_elems)[:, :, :hidden]

    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The zero-copy combine input of the next LL call's slot (see docs/semantics.md)."""
        _, _, t_max, hidden, num_experts = handle
        return self._combine_send_view(self._slot, t_max, hidden, num_experts)

    def clean_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zero the signalling area of both slots and the epochs, then synchronise the ranks (collective)."""
        lay = self._layout(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if self._workspace is not None:
            self._workspace[:_WS_HEADER].zero_()
        self._reset_signals(lay, "clean_low_latency_buffer")

    # ------------------------------------------------------------------------------ shrink mode
    def update_mask(self, rank_to_mask: int, mask: bool) -> None:
        assert self.enable_shrink and 0 <= rank_to_mask < self.num_ranks
        self._mask[rank_to_mask] = 1 if mask else 0

    def query_mask(self, mask_status: torch.Tensor) -> None:
        assert self.enable_shrink
        mask_status.copy_(self._mask.to(device=mask_status.device, dtype=mask_status.dtype))

    def clean_mask(self) -> None:
        assert self.enable_shrink
        self._mask.zero_()
        self._flags[1] = 0

    def timeouts_masked(self) -> bool:
        """True when a device-side timeout masked a rank since the last `clean_mask` (shrink mode)."""
        return int(self._flags[1]) != 0
