"""`deep_ep.Buffer`: the one public class (DeepEP V1's API).

It checks every argument, applies the stream/event rules, picks an engine at construction and
forwards the work to it; it never moves data itself. See `docs/semantics.md` for the exact outputs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _agree, _env, _native
from ._checks import ArgChecker, all_same_device
from ._comm import CommError, Communicator
from ._sizes import check_low_latency_buffer, check_normal_buffer
from .config import (Config, get_combine_config as _get_combine_config,
                     get_dispatch_config as _get_dispatch_config,
                     get_low_latency_rdma_size_hint as _ll_size_hint)
from .engines.local_buffers import LocalBuffers
from .engines.portable import PortableEngine
from .utils import EventHandle, EventOverlap

__all__ = ["Buffer", "topk_idx_t"]

topk_idx_t = torch.int64
"""dtype of top-k expert indices (``torch.int64``)."""

_MAX_TOPK = 32
_MAX_TOPK_LOW_LATENCY = 16
_MAX_NVL_BITS = 32  # SourceMeta carries a 32-bit mask of the receiving ranks of a node

_FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None),
                                torch.uint8, torch.int8) if d is not None)
_TWO_BYTE_DTYPES = (torch.bfloat16, torch.float16, torch.int16)
_SCALE_DTYPES = (torch.float32, torch.int32)


class _Launch:
    """DeepEP's stream rules for one call.

    On CUDA the work runs on the comm stream after ``previous_event`` (or the current stream); with
    ``async_finish`` the caller gets an event and every tensor is ``record_stream``-ed (``inputs`` must
    hold every tensor the call reads, handle fields included: the caller may free them at once), otherwise the
    current stream waits for the comm stream. On CPU the work is finished when the call returns; the
    event is then an already-complete `EventHandle`.
    """

    def __init__(self, buffer: "Buffer", inputs: Sequence[Optional[torch.Tensor]],
                 previous_event: Optional[EventOverlap], async_finish: bool, on_comm_stream: bool = True) -> None:
        self.inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        self.previous_event = previous_event
        self.async_finish = async_finish
        self.cuda = on_comm_stream and any(t.is_cuda for t in self.inputs) and torch.cuda.is_available()
        self.buffer = buffer
        self._ctx = None
        self._threads = None

    def __enter__(self) -> "_Launch":
        if self.cuda:
            self.compute = torch.cuda.current_stream()
            self.comm = self.buffer.get_comm_stream()
            if self.previous_event is not None and self.previous_event.event is not None:
                self.previous_event.event.stream_wait(self.comm)
            else:
                self.comm.wait_stream(self.compute)
            self._ctx = torch.cuda.stream(self.comm)
            self._ctx.__enter__()
        elif self.previous_event is not None and self.previous_event.event is not None:
            self.previous_event.event.synchronize()
        if not self.cuda:  # CPU work: cap torch's threads to this host's cores per local rank
            self._threads = self.buffer._comm.threads
            self._threads.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None
        if self._threads is not None:
            self._threads.__exit__(*exc)
            self._threads = None

    def finish(self, outputs: Sequence[Any]) -> EventOverlap:
        if not self.cuda:
            return EventOverlap(EventHandle()) if self.async_finish else EventOverlap()
        tensors = _flatten_tensors(outputs)
        for t in tensors:
            if t.is_cuda:
                t.record_stream(self.compute)
        if self.async_finish:
            for t in self.inputs + tensors:
                if t.is_cuda:
                    t.record_stream(self.comm)
            return EventOverlap(EventHandle(self.comm))
        self.compute.wait_stream(self.comm)
        return EventOverlap()


def _flatten_tensors(objs: Any) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    stack = [objs]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return out


class Buffer:
    """The expert-parallel communication buffer (DeepEP V1 API).

    One object per EP group. Normal mode: `get_dispatch_layout`, `dispatch`, `combine` (training,
    prefill). Low-latency mode: `low_latency_dispatch`, `low_latency_combine` (decoding, fixed shapes).

    Args:
        group: the EP group, a ``torch.distributed`` ProcessGroup of any backend (a gloo group is fine
            even with CUDA tensors). ``None`` to bootstrap from ``comm`` instead.
        num_nvl_bytes: bytes of the intranode (NVLink) buffer; a multiple of 128.
        num_rdma_bytes: bytes of the RDMA buffer (internode normal mode and all low-latency mode); a
            multiple of 128. Low-latency mode needs `get_low_latency_rdma_size_hint` bytes; normal mode across
            nodes `Config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=P)` (every engine).
        low_latency_mode: enables the low-latency methods.
        num_qps_per_rank: RDMA queue pairs per peer (CUDA engine; ignored by the portable engine).
        allow_nvlink_for_low_latency_mode: let low-latency traffic use NVLink between peers that have it.
        allow_mnnvl: allow multi-node NVLink (CUDA engine).
        use_fabric: allocate the NVLink buffer with fabric handles (CUDA engine).
        explicitly_destroy: if True, resources are released only by `destroy()`.
        enable_shrink: fault-tolerant low-latency mode: ranks can be masked out.
        comm: an mpi4py communicator to bootstrap from when ``group`` is None.

    Attributes:
        engine: ``"portable"`` (torch.distributed collectives) or ``"cuda"`` (compiled kernels).
        engine_reason: why that engine was chosen.
        num_ranks_per_node: ranks sharing a host (or ``DEEP_EP_RANKS_PER_NODE``).
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: Optional[Any] = None) -> None:
        chk = ArgChecker("deep_ep.Buffer")
        if group is None and comm is None:
            chk.fail("group", "is None and no `comm` (mpi4py communicator) was given; pass a "
                              "torch.distributed group or comm=MPI.COMM_WORLD")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            chk.fail("group", f"must be a torch.distributed ProcessGroup or None, got {type(group).__name__}",
                     TypeError)
        if group is None and not (hasattr(comm, "allgather") and hasattr(comm, "Get_rank")):
            chk.fail("comm", f"must be an mpi4py communicator, got {type(comm).__name__}", TypeError)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            chk.integer(name, value, 0)
            if value % 128 != 0:
                chk.fail(name, f"must be a multiple of 128, got {value}")
        chk.integer("num_qps_per_rank", num_qps_per_rank, 1)
        for name, value in (("low_latency_mode", low_latency_mode),
                            ("allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode),
                            ("allow_mnnvl", allow_mnnvl), ("use_fabric", use_fabric),
                            ("explicitly_destroy", explicitly_destroy), ("enable_shrink", enable_shrink)):
            chk.flag(name, value)

        self._comm = Communicator(group, comm)
        self.group = group
        self.comm = comm
        self.rank = self._comm.rank
        self.group_size = self._comm.size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.use_fabric = use_fabric
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink

        self.num_ranks_per_node = self._detect_ranks_per_node()
        self.num_nodes = self.group_size // self.num_ranks_per_node
        if self.num_nodes > 1 and self.num_ranks_per_node > _MAX_NVL_BITS:
            raise ValueError(f"deep_ep.Buffer: multi-node layouts support at most {_MAX_NVL_BITS} ranks per node, "
                             f"got {self.num_ranks_per_node} (DEEP_EP_RANKS_PER_NODE or host layout)")

        self._engine = PortableEngine(self._comm, self.num_ranks_per_node)
        self._cuda = None  # CudaEngine for normal mode on CUDA tensors, when every rank can run it
        self._ll = None
        self._ll_cuda = None  # CudaLowLatency for low-latency calls on CUDA tensors, when every rank can run it
        self._destroyed = False
        try:
            # Every rank checks that all ranks passed the same sizes and modes (one small exchange); a rank
            # that raises from here on (engine probes, set-up) tells its peers through its heartbeat.
            with _agree.guard(self, "__init__"):
                _agree.describe(self._comm, portable=True, nvl_bytes=num_nvl_bytes, rdma_bytes=num_rdma_bytes,
                                ll_mode=low_latency_mode, shrink=enable_shrink)
                _agree.exchange(self._comm, None, "__init__ (agreement)")
            self.engine, self.engine_reason = self._choose_engine(num_nvl_bytes)
            # CPU tensors: same-host shared memory when every rank is on this host, else gloo (deep_ep._shm).
            # With low_latency_mode the RDMA bytes become the low-latency receive slots that the peers
            # write into (the LL engine's push path), apart from the all-to-all's data area.
            self.transport_reason = self._comm.enable_shm(
                num_nvl_bytes + (0 if low_latency_mode else num_rdma_bytes),
                num_rdma_bytes if low_latency_mode else 0)
            if self._comm.shm is None:
                self.transport_reason += f"; {self._comm.enable_row_streams()}"
            self.engine_reason += f"; CPU tensors: {self.transport_reason}; CPU loops: {_native.status()}"
            self._local = LocalBuffers(num_nvl_bytes, num_rdma_bytes)
            self.ll_engine, self.ll_engine_reason = "portable", "low_latency_mode=False"
            if low_latency_mode:
                self.ll_engine, self.ll_engine_reason = self._choose_ll_engine()
                self.engine_reason += f"; low-latency mode: {self.ll_engine} engine ({self.ll_engine_reason})"
        except BaseException as exc:
            if not isinstance(exc, CommError) and not getattr(exc, "deep_ep_coordinated", False):
                self._comm.publish_error("__init__", exc, broken=True)
            self._destroyed = True
            for engine in (self._cuda, self._ll_cuda):
                if engine is not None:
                    engine.destroy(collective=False)
            self._comm.close()
            raise
        self._comm_stream = None

    def _choose_engine(self, num_nvl_bytes: int) -> Tuple[str, str]:
        """Collective: the CUDA engine when every rank can run it (core built, CUDA device, one host whose
        GPUs reach each other), else the portable engine; ``DEEP_EP_ENGINE`` forces either."""
        forced = _env.engine_override()
        if forced == "portable":
            return "portable", "forced by DEEP_EP_ENGINE=portable"
        if self.num_nodes > 1:
            from .engines import cuda_internode
            ok, reason, transport, facts = cuda_internode.probe(self._comm, self.num_ranks_per_node, num_nvl_bytes,
                                                                self.num_rdma_bytes)
        else:
            from .engines import cuda as cuda_engine
            ok, reason, _ = cuda_engine.probe(self._comm, self.num_ranks_per_node, num_nvl_bytes)
        if not ok:
            # (emulated, like cuda, raises; but a low-latency-only Buffer has no normal-mode buffer to run)
            if forced == "cuda" or (forced == "emulated" and num_nvl_bytes > 0):
                raise RuntimeError(f"deep_ep.Buffer: DEEP_EP_ENGINE={forced}, but the CUDA engine is not available: "
                                   f"{reason}")
            return "portable", f"the CUDA engine is not available: {reason}"
        if self.num_nodes > 1:
            # With low-latency mode too, the NVSHMEM heap holds both engines' buffers.
            heap = self.num_rdma_bytes * (2 if self.low_latency_mode else 1)
            self._cuda = cuda_internode.CudaInternodeEngine(
                self._comm, self.num_ranks_per_node, num_nvl_bytes, self.num_rdma_bytes, transport,
                num_qps_per_rank=self.num_qps_per_rank, allow_mnnvl=self.allow_mnnvl,
                # NVSHMEM's settings are per process: with low-latency mode too, honour its NVLink flag.
                allow_nvlink=self.allow_nvlink_for_low_latency_mode if self.low_latency_mode else True,
                single_host=len({f["host"] for f in facts}) == 1, nvshmem_heap_bytes=heap)
        else:
            self._cuda = cuda_engine.CudaEngine(self._comm, self.num_ranks_per_node, num_nvl_bytes)
        if forced == "emulated":  # the CUDA engine's code and kernels on CPU tensors (engines/emulated.py)
            return "emulated", "forced by DEEP_EP_ENGINE=emulated: " + reason
        return "cuda", ("forced by DEEP_EP_ENGINE=cuda: " if forced == "cuda" else "") + reason

    def _choose_ll_engine(self) -> Tuple[str, str]:
        """Collective: the CUDA low-latency kernels when every rank can run them (core built, CUDA device,
        peer memory or NVSHMEM usable: `deep_ep.engines.cuda_ll.probe_ll`), else the portable engine;
        ``DEEP_EP_ENGINE`` forces either, ``DEEP_EP_LL_TRANSPORT`` (auto/peer/nvshmem) picks the transport."""
        forced = _env.engine_override()
        if forced == "portable":
            return "portable", "forced by DEEP_EP_ENGINE=portable"
        from .engines import cuda_ll
        ok, reason, transport, facts = cuda_ll.probe_ll(self._comm, self.num_rdma_bytes,
                                                        self.allow_nvlink_for_low_latency_mode)
        if not ok:
            if forced in ("cuda", "emulated"):
                raise RuntimeError(f"deep_ep.Buffer: DEEP_EP_ENGINE={forced}, but the CUDA low-latency engine is not "
                                   f"available: {reason}")
            return "portable", f"the CUDA low-latency engine is not available: {reason}"
        single_host = len({f["host"] for f in facts}) == 1
        self._ll_cuda = cuda_ll.CudaLowLatency(self._comm, self.num_rdma_bytes, self.enable_shrink, transport,
                                               self.num_qps_per_rank, self.allow_nvlink_for_low_latency_mode,
                                               self.allow_mnnvl, single_host)
        if forced == "emulated":
            return "emulated", "forced by DEEP_EP_ENGINE=emulated: " + reason
        return "cuda", ("forced by DEEP_EP_ENGINE=cuda: " if forced == "cuda" else "") + reason

    def _engine_for(self, t: torch.Tensor):
        """The engine a normal-mode call runs on: CUDA for CUDA tensors when available (the emulated
        engine: for CPU tensors)."""
        return self._cuda if self._cuda is not None and t.device.type == self._cuda.device.type else self._engine

    def _config_kw(self, engine, config: Optional[Config]) -> dict:
        """The CUDA engine also takes the config (ring sizes); the portable one does not."""
        return {"config": config} if engine is self._cuda else {}

    # ------------------------------------------------------------------------------ topology
    def _detect_ranks_per_node(self) -> int:
        override = _env.ranks_per_node_override()
        size = self.group_size
        if override is not None:
            if size % override != 0:
                raise ValueError(f"deep_ep.Buffer: DEEP_EP_RANKS_PER_NODE={override} does not divide the group size "
                                 f"{size}")
            return override
        hosts = self._comm.hostnames
        per = hosts.count(hosts[0])
        regular = size % per == 0 and all(hosts[i] == hosts[(i // per) * per] for i in range(size)) and \
            len(set(hosts)) == size // per
        if not regular:
            raise ValueError("deep_ep.Buffer: the ranks of each host must be contiguous and equally many "
                             f"(hosts by rank: {hosts}); set DEEP_EP_RANKS_PER_NODE to describe the layout")
        return per

    def get_num_rdma_ranks(self) -> int:
        """Number of nodes (DeepEP's RDMA ranks)."""
        return self.num_nodes

    def get_rdma_rank(self) -> int:
        """This rank's node index."""
        return self.rank // self.num_ranks_per_node

    def get_root_rdma_rank(self, global_rank: bool) -> int:
        """This rank's local index in its node (``global_rank``: kept for DeepEP compatibility)."""
        return self.rank % self.num_ranks_per_node

    def get_local_device_id(self) -> int:
        return torch.cuda.current_device() if torch.cuda.is_available() else -1

    # ------------------------------------------------------------------------- life cycle
    def _alive(self, where: str) -> None:
        if self._destroyed:
            raise RuntimeError(f"deep_ep.Buffer.{where}: this buffer was destroyed")
        if self._comm.failed:
            raise CommError(f"deep_ep.Buffer.{where}: this Buffer failed earlier: {self._comm.failed.rstrip('.')}; "
                            f"create a new Buffer", op=where, rank=self.rank)

    def _failure_exchange(self, method: str, ll: bool) -> None:
        """This rank raised before its call's first exchange: take part in it, flagged (deep_ep._agree)."""
        if ll and self._ll is not None:
            self._ll._begin_call()  # the peers' portable low-latency engines took a double-buffer slot
        if ll and self.enable_shrink:
            # Low-latency calls in shrink mode exchange point to point, not through the common exchange.
            if method == "clean_low_latency_buffer":
                raise RuntimeError("no header exchange to take part in")  # the peers learn it from the heartbeat
            self._ll_engine().failure_exchange(f"{method} (header exchange)")
            return
        _agree.exchange(self._comm, None, f"{method} (agreement)")

    def destroy(self) -> None:
        """Release the buffer's resources (requires ``explicitly_destroy=True``); it is unusable afterwards."""
        if not self.explicitly_destroy:
            raise RuntimeError("deep_ep.Buffer.destroy: `explicitly_destroy` must be True to call destroy(); "
                               "without it resources are released when the Buffer is garbage-collected")
        if self._destroyed:
            raise RuntimeError("deep_ep.Buffer.destroy: this buffer was destroyed")
        if self._comm.failed:  # no collective can succeed any more: release this rank's resources only
            self._release()
            return
        try:
            with _agree.guard(self, "destroy"):
                _agree.exchange(self._comm, None, "destroy")
            if self._cuda is not None:
                # waits for this GPU, then for every rank, before freeing peer-mapped memory
                self._cuda.destroy(collective=True)
            if self._ll_cuda is not None:
                self._ll_cuda.destroy(collective=True)  # same, for the low-latency buffer (NVSHMEM: frees, finalizes)
        finally:
            self._release()

    def _release(self) -> None:
        self._destroyed = True
        if getattr(self, "_cuda", None) is not None:
            self._cuda.destroy(collective=False)
            self._cuda = None
        if getattr(self, "_ll_cuda", None) is not None:
            self._ll_cuda.destroy(collective=False)
            self._ll_cuda = None
        self._local.release()
        self._ll = None
        self._comm.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "explicitly_destroy", True) and not getattr(self, "_destroyed", True):
                self._release()
        except Exception:
            pass

    # ------------------------------------------------------------------------- static helpers
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when the compiled core was built with SM90 features (FP8, TMA). False without a core."""
        from . import _core
        lib = _core.load()
        return bool(lib is not None and lib.is_sm90())

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """Set the SM count the default configs use (even: one channel = two SMs)."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int):
            raise TypeError(f"deep_ep.Buffer.set_num_sms: `new_num_sms` must be an int, got "
                            f"{type(new_num_sms).__name__}")
        if new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"deep_ep.Buffer.set_num_sms: `new_num_sms` must be a positive even number "
                             f"(one channel = two SMs), got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An `EventOverlap` recorded on the current stream (for ``previous_event``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """RDMA bytes `low_latency_dispatch`/`low_latency_combine` need (DeepEP V1's formula)."""
        return _ll_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP V1's tuned dispatch config for ``num_ranks`` (next larger table entry for other sizes)."""
        return _get_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP V1's tuned combine config for ``num_ranks`` (next larger table entry for other sizes)."""
        return _get_combine_config(num_ranks, Buffer.num_sms)

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """The high-priority communication stream (CUDA only; None without CUDA)."""
        if not torch.cuda.is_available():
            return None
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream(priority=-1)
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's raw NVLink (or RDMA) buffer as a tensor of ``dtype`` starting at byte ``offset``,
        optionally the first ``prod(size)`` elements viewed as ``size``."""
        self._alive("get_local_buffer_tensor")
        chk = ArgChecker("deep_ep.Buffer.get_local_buffer_tensor")
        if not isinstance(dtype, torch.dtype):
            chk.fail("dtype", f"must be a torch.dtype, got {type(dtype).__name__}", TypeError)
        chk.integer("offset", offset, 0)
        kind = "rdma" if use_rdma_buffer else "nvl"
        total = self._local.num_bytes[kind]
        elem = torch.empty((), dtype=dtype).element_size()
        if offset > total or offset % elem != 0:
            chk.fail("offset", f"must be a multiple of {elem} within the {total}-byte buffer, got {offset}")
        if kind == "nvl" and self._cuda is not None:
            whole = self._cuda.nvl_buffer()
        elif kind == "rdma" and self._ll_cuda is not None:
            whole = self._ll_cuda.rdma_buffer()  # the LL kernels' buffer (CUDA IPC or NVSHMEM symmetric heap)
        else:
            whole = self._local.get(kind)
        raw = whole[offset:]
        t = raw[: (raw.numel() // elem) * elem].view(dtype)
        if size is not None:
            n = 1
            for s in size:
                n *= int(s)
            if n > t.numel():
                chk.fail("size", f"{tuple(size)} needs {n * elem} bytes but only {t.numel() * elem} remain")
            t = t[:n].view(size)
        return t

    # ------------------------------------------------------------------------- normal mode
    def _check_event_args(self, chk: ArgChecker, previous_event, async_finish, allocate_on_comm_stream) -> None:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            chk.fail("previous_event", f"must be a deep_ep.EventOverlap or None, got {type(previous_event).__name__}",
                     TypeError)
        chk.flag("async_finish", async_finish)
        chk.flag("allocate_on_comm_stream", allocate_on_comm_stream)
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            chk.fail("allocate_on_comm_stream", "requires both `previous_event` and `async_finish=True`")

    def _check_num_experts(self, chk: ArgChecker, num_experts: Any) -> int:
        chk.integer("num_experts", num_experts, 1)
        if num_experts % self.group_size != 0:
            chk.fail("num_experts", f"must be a multiple of the number of ranks {self.group_size}, got {num_experts}")
        return num_experts

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Count the tokens each rank, node and expert receives (local; no communication).

        Args:
            topk_idx: ``[num_tokens, num_topk]`` `deep_ep.topk_idx_t`, expert of each slot; -1 = unused.
            num_experts: total experts; a multiple of the number of ranks.
            previous_event, async_finish, allocate_on_comm_stream: see `dispatch`.

        Returns:
            num_tokens_per_rank: ``[num_ranks]`` int32, tokens with an expert on each rank.
            num_tokens_per_rdma_rank: ``[num_nodes]`` int32 (None on one node).
            num_tokens_per_expert: ``[num_experts]`` int32, slots per expert.
            is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
            event: `EventOverlap` (holds an event when ``async_finish``).
        """
        self._alive("get_dispatch_layout")
        chk = ArgChecker("deep_ep.Buffer.get_dispatch_layout")
        self._check_num_experts(chk, num_experts)
        self._check_topk_idx(chk, topk_idx, num_experts, _MAX_TOPK)
        self._check_event_args(chk, previous_event, async_finish, allocate_on_comm_stream)
        with _Launch(self, [topk_idx], previous_event, async_finish) as launch:
            outputs = self._engine_for(topk_idx).get_dispatch_layout(topk_idx, num_experts)
        return (*outputs, launch.finish(outputs))

    def _check_topk_idx(self, chk: ArgChecker, topk_idx: Any, num_experts: int, max_topk: int,
                        num_tokens: Optional[int] = None) -> None:
        chk.tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), dim=2, dtype_hint="deep_ep.topk_idx_t")
        if num_tokens is not None and topk_idx.size(0) != num_tokens:
            chk.fail("topk_idx", f"must have one row per token of `x` ({num_tokens}), got {topk_idx.size(0)}")
        if not 1 <= topk_idx.size(1) <= max_topk:
            chk.fail("topk_idx", f"must have between 1 and {max_topk} columns (num_topk), got {topk_idx.size(1)}")
        if not (topk_idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            # min()/max() sync with the host, which a CUDA graph capture forbids: skipped while capturing
            chk.ids_in_range("topk_idx", topk_idx, num_experts)

    def _check_x(self, chk: ArgChecker, x: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                chk.fail("x", f"must be a tensor or a (x_fp8, x_scales) pair, got a {len(x)}-tuple")
            data, scales = x
            chk.tensor("x", data, dtypes=_FP8_DTYPES, dim=2, dtype_hint="the FP8 part of an (x, x_scales) pair")
            chk.tensor("x", scales, dtypes=_SCALE_DTYPES, dim=2, contiguous=False,
                       dtype_hint="the scales of an (x, x_scales) pair")
            if scales.size(0) != data.size(0):
                chk.fail("x", f"scales must have one row per token ({data.size(0)}), got shape {tuple(scales.shape)}")
            if scales.dtype == torch.float32:
                want = (data.size(1) + 127) // 128
            else:
                want = (data.size(1) + 511) // 512
            if scales.size(1) != want:
                chk.fail("x", f"scales must have {want} columns for hidden {data.size(1)} "
                              f"({'1x128 float32 blocks' if scales.dtype == torch.float32 else 'packed UE8M0 int32'}), "
                              f"got shape {tuple(scales.shape)}")
            if scales.device != data.device:
                chk.fail("x", f"scales must be on {data.device}, got {scales.device}")
        else:
            data, scales = x, None
            chk.tensor("x", data, dtypes=_TWO_BYTE_DTYPES, dim=2,
                       dtype_hint="a 2-byte dtype such as torch.bfloat16; pass FP8 as an (x, x_scales) pair")
        if (data.size(1) * data.element_size()) % 16 != 0:
            chk.fail("x", f"hidden * element size must be a multiple of 16 bytes, got hidden {data.size(1)} x "
                          f"{data.element_size()} bytes")
        return data, scales

    def _check_handle(self, chk: ArgChecker, handle: Any, num_tokens: Optional[int] = None) -> tuple:
        want = 6 if self.num_nodes == 1 else 10
        if not isinstance(handle, tuple) or len(handle) != want or \
                not all(isinstance(h, torch.Tensor) for h in handle):
            got = f"a {len(handle)}-tuple" if isinstance(handle, tuple) else type(handle).__name__
            chk.fail("handle", f"must be the {want}-tuple of tensors a dispatch of this buffer returned "
                               f"({self.num_nodes} node(s)), got {got}")
        R = self.group_size
        is_token_in_rank = handle[4] if want == 6 else handle[0]
        checks = [("is_token_in_rank", is_token_in_rank, torch.bool, (None, R))]
        if want == 6:
            checks += [("rank_prefix_matrix", handle[0], torch.int32, (R, R)),
                       ("channel_prefix_matrix", handle[1], torch.int32, (R, None)),
                       ("recv_channel_prefix_matrix", handle[2], torch.int32, (R, None)),
                       ("recv_src_idx", handle[3], torch.int32, (None,)),
                       ("send_head", handle[5], torch.int32, (None, R))]
        else:
            NN, P = self.num_nodes, self.num_ranks_per_node
            checks += [("rdma_channel_prefix_matrix", handle[1], torch.int32, (NN, None)),
                       ("gbl_channel_prefix_matrix", handle[2], torch.int32, (R, None)),
                       ("recv_rdma_channel_prefix_matrix", handle[3], torch.int32, (NN, None)),
                       ("recv_rdma_rank_prefix_sum", handle[4], torch.int32, (NN,)),
                       ("recv_gbl_channel_prefix_matrix", handle[5], torch.int32, (R, None)),
                       ("recv_gbl_rank_prefix_sum", handle[6], torch.int32, (R,)),
                       ("recv_src_meta", handle[7], torch.uint8, (None, 8)),
                       ("send_rdma_head", handle[8], torch.int32, (None, NN)),
                       ("send_nvl_head", handle[9], torch.int32, (None, P))]
        for name, t, dtype, shape in checks:
            if t.dtype != dtype or t.dim() != len(shape) or \
                    any(s is not None and s != a for s, a in zip(shape, t.shape)):
                chk.fail("handle", f"field `{name}` has dtype {t.dtype} and shape {tuple(t.shape)}, expected {dtype} "
                                   f"and {tuple('*' if s is None else s for s in shape)}: the handle comes from a "
                                   f"buffer with another group size or node layout")
        if num_tokens is not None and is_token_in_rank.size(0) != num_tokens:
            chk.fail("handle", f"was made for {is_token_in_rank.size(0)} tokens, but `x` has {num_tokens}")
        return handle

    @_agree.collective("dispatch")
    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Optional[Tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], Optional[torch.Tensor],
                  Optional[torch.Tensor], List[int], Tuple, EventOverlap]:
        """Send each token to every rank that holds one of its experts.

        Args:
            x: ``[num_tokens, hidden]`` of a 2-byte dtype (``torch.bfloat16``), or a pair
                ``(x_fp8 [num_tokens, hidden] torch.float8_e4m3fn, x_scales [num_tokens, hidden/128] float32
                (or [num_tokens, hidden/512] int32 packed UE8M0), any strides)``.
                ``hidden * element_size`` must be a multiple of 16.
            handle: from an earlier dispatch: cached mode (no count exchange; ``topk_*`` must be None).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert: the
                outputs of `get_dispatch_layout` (required without ``handle``; the RDMA one may be None).
            topk_idx: ``[num_tokens, num_topk]`` `topk_idx_t` or None (then no top-k outputs).
            topk_weights: ``[num_tokens, num_topk]`` float32; given iff ``topk_idx`` is.
            expert_alignment: round each per-expert count in the returned list up to this multiple.
            num_worst_tokens: if > 0, outputs have exactly this many rows (no host-side size), the list is
                empty; needs ``topk_idx``. Every rank raises if some rank would receive more.
            config: `Config`; default `get_dispatch_config(num_ranks)`. Sets the handle's channels.
            previous_event: run after this event instead of after the current stream.
            async_finish: return an event instead of making the current stream wait.
            allocate_on_comm_stream: allocate outputs on the comm stream (needs both options above).

        Returns:
            recv_x: like ``x`` (a tensor or a pair), rows ordered by source rank then source token order.
            recv_topk_idx: ``[num_recv, num_topk]`` int64 local expert ids, -1 elsewhere (None in cached mode
                or without top-k).
            recv_topk_weights: ``[num_recv, num_topk]`` float32, 0 where the id is -1.
            num_recv_tokens_per_expert_list: Python ints, one per local expert, aligned.
            handle: 6-tuple (one node) or 10-tuple (several nodes), see docs/semantics.md.
            event: `EventOverlap`.
        """
        self._alive("dispatch")
        chk = ArgChecker("deep_ep.Buffer.dispatch")
        data, scales = self._check_x(chk, x)
        num_tokens = data.size(0)
        self._check_event_args(chk, previous_event, async_finish, allocate_on_comm_stream)
        chk.integer("expert_alignment", expert_alignment, 1)
        chk.integer("num_worst_tokens", num_worst_tokens, 0)
        if config is not None and not isinstance(config, Config):
            chk.fail("config", f"must be a deep_ep.Config or None, got {type(config).__name__}", TypeError)
        if (topk_idx is None) != (topk_weights is None):
            given, missing = ("topk_idx", "topk_weights") if topk_weights is None else ("topk_weights", "topk_idx")
            chk.fail(missing, f"must be given together with `{given}` (both or neither)")

        if handle is not None:
            if topk_idx is not None:
                chk.fail("handle", "cached dispatch (with `handle`) takes no `topk_idx`/`topk_weights`; they travel "
                                   "only in the first dispatch")
            self._check_handle(chk, handle, num_tokens)
            self._check_sizes("dispatch", data, config, combine=False)
            engine = self._engine_for(data)
            key = handle[0] if len(handle) == 6 else handle[1]  # a tensor each dispatch creates (deep_ep._agree)
            _agree.describe(self._comm, "cached dispatch", portable=engine is self._engine, device=data.device,
                            hidden=data.size(1), x_dtype=data.dtype, scale_dtype=None if scales is None else scales.dtype,
                            scale_cols=0 if scales is None else scales.size(1), handle=_agree.handle_id(self._comm, key))
            with _Launch(self, [data, scales, *_flatten_tensors(handle)], previous_event, async_finish) as launch:
                recv = engine.cached_dispatch(data, scales, handle, **self._config_kw(engine, config))
            recv_x = recv
            return recv_x, None, None, None, None, launch.finish([recv_x])

        R = self.group_size
        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
            if value is None:
                chk.fail(name, "is required without `handle` (take it from get_dispatch_layout)")
        chk.tensor("num_tokens_per_rank", num_tokens_per_rank, dtypes=(torch.int32,), shape=(R,))
        chk.tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), shape=(num_tokens, R))
        chk.tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32,), dim=1)
        num_experts = num_tokens_per_expert.size(0)
        if num_experts % R != 0:
            chk.fail("num_tokens_per_expert", f"must have a multiple of {R} entries (num_experts), got {num_experts}")
        if num_tokens_per_rdma_rank is not None:
            chk.tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, dtypes=(torch.int32,),
                       shape=(self.num_nodes,))
        if topk_idx is not None:
            self._check_topk_idx(chk, topk_idx, num_experts, _MAX_TOPK, num_tokens)
            chk.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_idx.shape))
        elif num_worst_tokens > 0:
            chk.fail("num_worst_tokens", "needs `topk_idx` and `topk_weights`")
        if all_same_device([data, scales, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights]) is None:
            chk.fail("x", "and the other tensor arguments must all be on one device")
        self._check_sizes("dispatch", data, config, combine=False)
        config = config if config is not None else self.get_dispatch_config(R)
        engine = self._engine_for(data)
        _agree.describe(self._comm, portable=engine is self._engine, device=data.device, hidden=data.size(1),
                        x_dtype=data.dtype, scale_dtype=None if scales is None else scales.dtype,
                        scale_cols=0 if scales is None else scales.size(1),
                        topk=0 if topk_idx is None else topk_idx.size(1), experts=num_experts,
                        channels=config.num_channels, worst=num_worst_tokens)

        with _Launch(self, [data, scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                            num_tokens_per_rank, num_tokens_per_rdma_rank], previous_event, async_finish) as launch:
            recv_x, recv_topk_idx, recv_topk_weights, counts, handle = engine.dispatch(
                data, scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, expert_alignment,
                num_worst_tokens, config.num_channels, **self._config_kw(engine, config))
        _agree.note_handle(self._comm, handle[0] if len(handle) == 6 else handle[1])
        event = launch.finish([recv_x, recv_topk_idx, recv_topk_weights, handle])
        return recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event

    @_agree.collective("combine")
    def combine(self, x: torch.Tensor, handle: Tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Send the rows back to their source ranks and sum them per token (no weights applied).

        Args:
            x: ``[num_recv_tokens, hidden]`` torch.bfloat16, rows in the order dispatch returned them.
            handle: the handle of that dispatch.
            topk_weights: optional ``[num_recv_tokens, num_topk]`` float32, summed the same way.
            bias: None, a tensor, or a pair of tensors ``[num_tokens, hidden]`` of ``x``'s dtype, added in fp32.
            config, previous_event, async_finish, allocate_on_comm_stream: see `dispatch`.

        Returns:
            combined_x: ``[num_tokens, hidden]``, ``bf16(sum_bias + sum over the ranks the token went to)``.
            combined_topk_weights: ``[num_tokens, num_topk]`` float32 or None.
            event: `EventOverlap`.
        """
        self._alive("combine")
        chk = ArgChecker("deep_ep.Buffer.combine")
        chk.tensor("x", x, dtypes=(torch.bfloat16,), dim=2)
        if (x.size(1) * x.element_size()) % 16 != 0:
            chk.fail("x", f"hidden * 2 must be a multiple of 16 bytes, got hidden {x.size(1)}")
        self._check_handle(chk, handle)
        self._check_event_args(chk, previous_event, async_finish, allocate_on_comm_stream)
        if config is not None and not isinstance(config, Config):
            chk.fail("config", f"must be a deep_ep.Config or None, got {type(config).__name__}", TypeError)
        num_rows = handle[3].size(0) if len(handle) == 6 else handle[7].size(0)
        if x.size(0) != num_rows:
            chk.fail("x", f"must have one row per token the dispatch received ({num_rows}), got {x.size(0)}")
        if topk_weights is not None:
            # Any strides: autograd hands gradients of broadcasts over as expanded views.
            chk.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, contiguous=False)
            if topk_weights.size(0) != num_rows:
                chk.fail("topk_weights", f"must have {num_rows} rows like `x`, got {topk_weights.size(0)}")
        num_tokens = (handle[4] if len(handle) == 6 else handle[0]).size(0)
        if bias is None:
            biases: Sequence[torch.Tensor] = ()
        elif isinstance(bias, torch.Tensor):
            biases = (bias,)
        elif isinstance(bias, (tuple, list)) and len(bias) <= 2:
            biases = tuple(b for b in bias if b is not None)
        else:
            chk.fail("bias", f"must be None, a tensor or a pair of tensors, got {type(bias).__name__}", TypeError)
        for b in biases:
            chk.tensor("bias", b, dtypes=(x.dtype,), shape=(num_tokens, x.size(1)))
        self._check_sizes("combine", x, config, combine=True)
        engine = self._engine_for(x)
        _agree.describe(self._comm, portable=engine is self._engine, device=x.device, hidden=x.size(1),
                        x_dtype=x.dtype, weights=0 if topk_weights is None else topk_weights.size(1),
                        handle=_agree.handle_id(self._comm, handle[0] if len(handle) == 6 else handle[1]))
        with _Launch(self, [x, topk_weights, *biases, *_flatten_tensors(handle)], previous_event,
                     async_finish) as launch:
            combined_x, combined_w = engine.combine(x, handle, topk_weights, biases, **self._config_kw(engine, config))
        return combined_x, combined_w, launch.finish([combined_x, combined_w])

    def _check_sizes(self, method: str, x: torch.Tensor, config: Optional[Config], combine: bool) -> None:
        """The buffer-size rule of every engine (`deep_ep._sizes`), before any collective."""
        R = self.group_size
        name = "config" if config is not None else f"Buffer.get_{'combine' if combine else 'dispatch'}_config({R})"
        if config is None:
            config = self.get_combine_config(R) if combine else self.get_dispatch_config(R)
        check_normal_buffer(f"deep_ep.Buffer.{method}", self.num_nvl_bytes,
                            x.size(1) * max(x.element_size(), 2), R, self.num_ranks_per_node, config, name,
                            num_rdma_bytes=self.num_rdma_bytes)

    def internode_dispatch(self, *args, **kwargs):
        """DeepEP's internode entry point; `dispatch` routes multi-node layouts itself."""
        return self.dispatch(*args, **kwargs)

    def internode_combine(self, *args, **kwargs):
        """DeepEP's internode entry point; `combine` routes multi-node layouts itself."""
        return self.combine(*args, **kwargs)

    # ------------------------------------------------------------------------- low-latency mode
    def _ll_engine(self, t: Optional[torch.Tensor] = None):
        """The LL engine for a call on tensor `t`: the CUDA kernels for CUDA tensors when available."""
        if self._ll_cuda is not None and t is not None and t.device.type == self._ll_cuda.device.type:
            return self._ll_cuda
        if self._ll is None:
            from .engines.portable_ll import PortableLowLatency
            self._ll = PortableLowLatency(self._comm, self._local, self.num_rdma_bytes, self.enable_shrink)
        return self._ll

    def _check_ll_common(self, chk: ArgChecker, num_max_dispatch_tokens_per_rank: Any, hidden: int,
                         num_experts: Any) -> None:
        if not self.low_latency_mode:
            chk.fail("low_latency_mode", "must be True: construct the Buffer with low_latency_mode=True to use the "
                                         "low-latency methods", RuntimeError)
        chk.integer("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        self._check_num_experts(chk, num_experts)
        check_low_latency_buffer(chk.where, self.num_rdma_bytes, num_max_dispatch_tokens_per_rank, hidden,
                                 self.group_size, num_experts)

    @_agree.collective("low_latency_dispatch", ll=True)
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, Tuple, EventOverlap,
                  Optional[Callable[[], None]]]:
        """Low-latency dispatch: every (token, top-k expert) pair lands in a fixed-shape per-expert layout.

        Args:
            x: ``[num_tokens, hidden]`` torch.bfloat16, ``hidden % 128 == 0``,
                ``num_tokens <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[num_tokens, num_topk]`` `topk_idx_t`, ``num_topk <= 16``, -1 = unused.
            num_max_dispatch_tokens_per_rank: the same on every rank; sizes the outputs.
            num_experts: total experts (a multiple of the number of ranks).
            cumulative_local_expert_recv_stats: optional ``[num_local_experts]`` int32, received counts are added.
            dispatch_wait_recv_cost_stats: optional ``[num_ranks]`` int64, receive wait time is added.
            use_fp8: cast to FP8 e4m3 with 1x128 block scales on the sender.
            round_scale: round scales up to powers of two.
            use_ue8m0: pack the power-of-two scales as UE8M0 bytes (needs ``round_scale``).
            async_finish: return an event (exclusive with ``return_recv_hook``).
            return_recv_hook: start the receive and return a hook that completes it.

        Returns:
            recv_x: ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`` bf16, or with
                FP8 a pair ``(fp8 data, scales)``: scales ``[.., hidden/128]`` float32 or ``[.., ceil(hidden/512)]``
                int32 (UE8M0), column-major in the last two dims.
            recv_count: ``[num_local_experts]`` int32 valid rows per expert.
            handle: ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)``.
            event: `EventOverlap`.
            hook: callable completing the receive, or None.
        """
        self._alive("low_latency_dispatch")
        chk = ArgChecker("deep_ep.Buffer.low_latency_dispatch")
        chk.tensor("x", x, dtypes=(torch.bfloat16,), dim=2)
        hidden = x.size(1)
        if hidden % 128 != 0:
            chk.fail("x", f"hidden must be a multiple of 128 in low-latency mode, got {hidden}")
        self._check_ll_common(chk, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if x.size(0) > num_max_dispatch_tokens_per_rank:
            chk.fail("x", f"has {x.size(0)} tokens, more than `num_max_dispatch_tokens_per_rank`="
                          f"{num_max_dispatch_tokens_per_rank}")
        self._check_topk_idx(chk, topk_idx, num_experts, _MAX_TOPK_LOW_LATENCY, x.size(0))
        num_local_experts = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            chk.tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                       dtypes=(torch.int32,), shape=(num_local_experts,))
        if dispatch_wait_recv_cost_stats is not None:
            chk.tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, dtypes=(torch.int64,),
                       shape=(self.group_size,))
        for name, value in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0),
                            ("async_finish", async_finish), ("return_recv_hook", return_recv_hook)):
            chk.flag(name, value)
        if use_ue8m0 and not round_scale:
            chk.fail("use_ue8m0", "requires `round_scale=True` (UE8M0 holds only power-of-two scales)")
        if async_finish and return_recv_hook:
            chk.fail("return_recv_hook", "cannot be combined with `async_finish=True`")
        if all_same_device([x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats]) is None:
            chk.fail("x", "and the other tensor arguments must all be on one device")
        ll_engine = self._ll_engine(x)
        _agree.describe(self._comm, portable=ll_engine is not self._ll_cuda, device=x.device, hidden=hidden,
                        x_dtype=x.dtype, tmax=num_max_dispatch_tokens_per_rank, experts=num_experts,
                        topk=topk_idx.size(1), fp8=use_fp8, round=round_scale, ue8m0=use_ue8m0)
        with _Launch(self, [x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats], None,
                     async_finish, on_comm_stream=async_finish) as launch:
            recv_x, recv_count, handle, hook = ll_engine.dispatch(
                x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
                dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0, return_recv_hook)
        _agree.note_handle(self._comm, handle[0])
        event = launch.finish([recv_x, recv_count, handle])
        if async_finish:
            event.extra_tensors = tuple(_flatten_tensors([x, topk_idx, recv_x, recv_count, handle]))
        return recv_x, recv_count, handle, event, hook

    def _check_ll_handle(self, chk: ArgChecker, handle: Any) -> Tuple[int, int, int]:
        if not isinstance(handle, tuple) or len(handle) != 5 or not isinstance(handle[0], torch.Tensor) or \
                not isinstance(handle[1], torch.Tensor):
            chk.fail("handle", "must be the 5-tuple (src_info, layout_range, num_max_dispatch_tokens_per_rank, "
                               "hidden, num_experts) low_latency_dispatch returned")
        src_info, layout_range, t_max, hidden, num_experts = handle
        R = self.group_size
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (t_max, hidden, num_experts)) \
                or num_experts % R != 0:
            chk.fail("handle", "must be the 5-tuple low_latency_dispatch returned (bad sizes)")
        e_loc = num_experts // R
        if src_info.dtype != torch.int32 or tuple(src_info.shape) != (e_loc, R * t_max) or \
                layout_range.dtype != torch.int64 or tuple(layout_range.shape) != (e_loc, R):
            chk.fail("handle", f"does not match this buffer ({R} ranks): src_info {tuple(src_info.shape)}, "
                               f"layout_range {tuple(layout_range.shape)}")
        return t_max, hidden, num_experts

    @_agree.collective("low_latency_combine", ll=True)
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: tuple, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> \
            Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """Low-latency combine: ``combined[t] = sum_k topk_weights[t, k] * expert_out(topk_idx[t, k], t)``.

        Args:
            x: ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`` torch.bfloat16
                in the dispatch layout (ignored with ``zero_copy``: the data is already in
                `get_next_low_latency_combine_buffer`).
            topk_idx, topk_weights: the original routing of this rank's tokens, ``[num_tokens, num_topk]``
                (`topk_idx_t`, float32).
            handle: from `low_latency_dispatch`.
            use_logfmt: round rows through LogFMT-10 (see docs/semantics.md); not with ``zero_copy``.
            zero_copy: the expert outputs were written into `get_next_low_latency_combine_buffer(handle)`.
            async_finish, return_recv_hook: as in `low_latency_dispatch`.
            out: optional ``[num_tokens, hidden]`` bf16 output.
            combine_wait_recv_cost_stats: optional ``[num_ranks]`` int64, receive wait time is added.

        Returns:
            combined_x ``[num_tokens, hidden]`` bf16, event, hook (or None).
        """
        self._alive("low_latency_combine")
        chk = ArgChecker("deep_ep.Buffer.low_latency_combine")
        t_max, hidden, num_experts = self._check_ll_handle(chk, handle)
        self._check_ll_common(chk, t_max, hidden, num_experts)
        e_loc, R = num_experts // self.group_size, self.group_size
        chk.tensor("x", x, dtypes=(torch.bfloat16,), shape=(e_loc, R * t_max, hidden), contiguous=not zero_copy)
        self._check_topk_idx(chk, topk_idx, num_experts, _MAX_TOPK_LOW_LATENCY)
        if topk_idx.size(0) > t_max:
            chk.fail("topk_idx", f"has {topk_idx.size(0)} tokens, more than num_max_dispatch_tokens_per_rank={t_max}")
        chk.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_idx.shape))
        for name, value in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy), ("async_finish", async_finish),
                            ("return_recv_hook", return_recv_hook)):
            chk.flag(name, value)
        if use_logfmt and zero_copy:
            chk.fail("use_logfmt", "cannot be combined with `zero_copy=True`")
        if async_finish and return_recv_hook:
            chk.fail("return_recv_hook", "cannot be combined with `async_finish=True`")
        if out is not None:
            chk.tensor("out", out, dtypes=(torch.bfloat16,), shape=(topk_idx.size(0), hidden))
        if combine_wait_recv_cost_stats is not None:
            chk.tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, dtypes=(torch.int64,),
                       shape=(R,))
        if all_same_device([x, topk_idx, topk_weights, out, combine_wait_recv_cost_stats]) is None:
            chk.fail("x", "and the other tensor arguments must all be on one device")
        ll_engine = self._ll_engine(topk_idx)
        _agree.describe(self._comm, portable=ll_engine is not self._ll_cuda, device=topk_idx.device, hidden=hidden,
                        x_dtype=x.dtype, tmax=t_max, experts=num_experts, logfmt=use_logfmt,
                        handle=_agree.handle_id(self._comm, handle[0]))
        with _Launch(self, [x, topk_idx, topk_weights, out, combine_wait_recv_cost_stats, *_flatten_tensors(handle)],
                     None, async_finish, on_comm_stream=async_finish) as launch:
            combined_x, hook = ll_engine.combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy,
                                                         return_recv_hook, out, combine_wait_recv_cost_stats)
        event = launch.finish([combined_x])
        if async_finish:
            event.extra_tensors = tuple(_flatten_tensors([x, topk_idx, topk_weights, combined_x, handle]))
        return combined_x, event, hook

    @_agree.collective("clean_low_latency_buffer", ll=True)
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency buffers' signalling state on every rank (collective)."""
        self._alive("clean_low_latency_buffer")
        chk = ArgChecker("deep_ep.Buffer.clean_low_latency_buffer")
        chk.integer("hidden", hidden, 128)
        if hidden % 128 != 0:
            chk.fail("hidden", f"must be a multiple of 128, got {hidden}")
        self._check_ll_common(chk, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        # Shrink mode exchanges point to point among the unmasked ranks only (a dead rank must not block).
        _agree.describe(self._comm, portable=not self.enable_shrink, tmax=num_max_dispatch_tokens_per_rank,
                        hidden=hidden, experts=num_experts)
        if not self.enable_shrink:
            _agree.exchange(self._comm, None, "clean_low_latency_buffer (agreement)")
        # Every LL engine in use (the portable one allocates a host RDMA buffer: only when already used).
        for engine in [e for e in (self._ll, self._ll_cuda) if e is not None] or [self._ll_engine()]:
            engine.clean_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_next_low_latency_combine_buffer(self, handle: object) -> torch.Tensor:
        """BF16 view ``[num_local_experts, num_ranks * T, hidden]`` of the buffer the next
        `low_latency_combine` reads with ``zero_copy=True``."""
        self._alive("get_next_low_latency_combine_buffer")
        chk = ArgChecker("deep_ep.Buffer.get_next_low_latency_combine_buffer")
        t_max, hidden, num_experts = self._check_ll_handle(chk, handle)
        self._check_ll_common(chk, t_max, hidden, num_experts)
        return self._ll_engine(handle[0]).get_next_combine_buffer(handle)

    def _check_shrink(self, where: str) -> ArgChecker:
        self._alive(where)
        chk = ArgChecker(f"deep_ep.Buffer.{where}")
        if not self.enable_shrink:
            chk.fail("enable_shrink", "must be True: construct the Buffer with enable_shrink=True to use rank masks",
                     RuntimeError)
        return chk

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask a rank for the low-latency methods on this rank."""
        chk = self._check_shrink("low_latency_update_mask_buffer")
        chk.integer("rank_to_mask", rank_to_mask, 0)
        if rank_to_mask >= self.group_size:
            chk.fail("rank_to_mask", f"must be < {self.group_size}, got {rank_to_mask}")
        chk.flag("mask", mask)
        for engine in (self._ll_engine(), self._ll_cuda):  # both engines keep the same mask
            if engine is not None:
                engine.update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Write the mask into ``mask_status`` (``[num_ranks]`` int32, 1 = masked)."""
        chk = self._check_shrink("low_latency_query_mask_buffer")
        chk.tensor("mask_status", mask_status, dtypes=(torch.int32,), shape=(self.group_size,))
        # The CUDA kernels may have masked a rank that timed out: their mask is the authoritative one.
        (self._ll_cuda or self._ll_engine()).query_mask(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank."""
        self._check_shrink("low_latency_clean_mask_buffer")
        for engine in (self._ll_engine(), self._ll_cuda):
            if engine is not None:
                engine.clean_mask()
