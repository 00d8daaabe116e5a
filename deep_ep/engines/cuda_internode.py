"""The CUDA engine, normal mode, several nodes: the two-hop kernels of ``csrc/kernels/internode.cuh``.

A token of rank ``(a, i)`` (node ``a``, local index ``i``) that needs ranks of node ``b`` travels once
over the RDMA hop to rank ``(b, i)``, which forwards it over NVLink to the ranks ``(b, j)`` that need
it; combine sums per node on the forwarder and once more across nodes on the source
(``docs/semantics.md``: "Handle, several nodes", "Normal combine"). Outputs and the 10-tuple handle
equal the portable engine's field by field.

Transport of the RDMA hop (``DEEP_EP_INTERNODE_TRANSPORT`` = ``auto`` | ``peer`` | ``nvshmem``):

* ``peer``: every rank maps every other rank's allocation (CUDA IPC), so all ranks share one host, at
  most 8 in all. That is what "virtual nodes" are (``DEEP_EP_RANKS_PER_NODE`` smaller than the ranks
  of the host, e.g. 2 x 2 or 4 x 2 on one GPU or one NVLink box), and what the GPU tests use.
* ``nvshmem``: the RDMA region is a symmetric NVSHMEM allocation (``libdeep_ep_nvshmem.so``, the
  public device API: IBGDA, IBRC, UCX, libfabric/EFA, P2P); the NVL region is mapped with CUDA IPC
  among the ranks of each node only. This is the path for real multi-node runs.
* ``auto`` (default): ``peer`` when it is possible, else ``nvshmem``.

Memory: ``num_nvl_bytes`` of NVL region (``Buffer.get_local_buffer_tensor`` shows it) and
``num_rdma_bytes`` of RDMA region (count exchange, barrier words, RDMA rings) per rank; over peer
memory both are one allocation.

Differences a caller can observe are those of `deep_ep.engines.cuda.CudaEngine` (``num_worst_tokens``
overflow raises at the next call), plus: with ``num_worst_tokens = W`` the forwarder's
``send_nvl_head`` has ``P * W`` rows (a bound that needs no CPU sync), rows past the forwarded count
being -1, as in the portable engine.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _core, _nvshmem
from .._comm import Communicator
from ..config import Config, get_combine_config, get_dispatch_config
from .cuda import CudaEngine, _ptr, _reach, local_status

__all__ = ["CudaInternodeEngine", "probe", "requested_transport", "TRANSPORTS"]

_I32 = torch.int32


TRANSPORTS = ("peer", "nvshmem")
# The core's limits (kMaxNvlRanks, kMaxInternodeNodes; a CPU test checks they agree), known without it,
# so that every rank answers the early questions alike.
MAX_RANKS_PER_NODE = 8
MAX_NODES = 16


def requested_transport() -> str:
    """``DEEP_EP_INTERNODE_TRANSPORT``: auto (default), peer or nvshmem."""
    value = os.environ.get("DEEP_EP_INTERNODE_TRANSPORT", "auto").strip().lower() or "auto"
    if value not in ("auto",) + TRANSPORTS:
        raise ValueError(f"DEEP_EP_INTERNODE_TRANSPORT must be auto, peer or nvshmem, got {value!r}")
    return value


def _local_facts(num_nvl_bytes: int) -> Tuple[bool, str, dict]:
    ok, reason, facts = local_status(num_nvl_bytes)
    if ok:
        nv = _core.load_nvshmem()
        facts = dict(facts, nvshmem=nv is not None, nvshmem_reason="" if nv is not None else
                     (_core.nvshmem_load_error() or "libdeep_ep_nvshmem.so is not available"),
                     nvshmem_remote=_nvshmem.remote_transport())
    return ok, reason, facts


def probe(comm: Communicator, num_ranks_per_node: int, num_nvl_bytes: int,
          num_rdma_bytes: int) -> Tuple[bool, str, str, List[dict]]:
    """Collective: whether every rank can run the internode kernels, and over which transport.

    Returns ``(ok, reason, transport, facts of every rank)``, the same on every rank. The early answers
    follow from values every rank shares (no collective is skipped by some ranks only).
    """
    R, P = comm.size, num_ranks_per_node
    num_nodes = R // P
    if num_nodes < 2:
        return False, "one node: the intranode engine applies", "", []
    if P > MAX_RANKS_PER_NODE:
        return False, f"{P} ranks per node: the internode kernels handle at most {MAX_RANKS_PER_NODE}", "", []
    if num_nodes > MAX_NODES:
        return False, f"{num_nodes} nodes: the internode kernels handle at most {MAX_NODES}", "", []
    if num_rdma_bytes <= 0:
        return False, ("num_rdma_bytes is 0: the internode kernels need an RDMA buffer "
                       "(Config.get_rdma_buffer_size_hint(..., num_ranks_per_node=...))"), "", []
    try:
        request, request_error = requested_transport(), ""
    except ValueError as exc:  # raised below on every rank, after the gather
        request, request_error = "auto", str(exc)
    ok, reason, facts = _local_facts(num_nvl_bytes)
    statuses = comm.all_gather_object((ok, reason, facts, request, request_error), op="CUDA internode engine probe")
    errors = [(p, e) for p, (_, _, _, _, e) in enumerate(statuses) if e]
    if errors:
        raise ValueError(f"deep_ep.Buffer: rank {errors[0][0]}: {errors[0][1]}")
    requests = [r for _, _, _, r, _ in statuses]
    if len(set(requests)) > 1:
        raise ValueError(f"deep_ep.Buffer: DEEP_EP_INTERNODE_TRANSPORT must be the same on every rank, got "
                         f"{requests} by rank")
    for peer, (ok, reason, _, _, _) in enumerate(statuses):
        if not ok:
            return False, f"rank {peer}: {reason}", "", []
    max_local = MAX_RANKS_PER_NODE
    facts = [f for _, _, f, _, _ in statuses]
    node = comm.rank // P
    members = list(range(node * P, node * P + P))
    single_host = len({f["host"] for f in facts}) == 1
    mine = (_reach(facts, comm.rank) if single_host and R <= max_local else (False, "not tried"),
            _reach([facts[m] for m in members], comm.rank - node * P))
    reach = comm.all_gather_object(mine, op="CUDA internode engine probe (peer access)")
    if not single_host:
        peer_reason = "the ranks span several hosts (peer memory needs one host)"
    elif R > max_local:
        peer_reason = f"{R} ranks: peer memory maps at most {max_local} ranks"
    else:
        bad = [(p, why) for p, ((ok, why), _) in enumerate(reach) if not ok]
        peer_reason = f"rank {bad[0][0]}: {bad[0][1]}" if bad else ""
    if request in ("auto", "peer") and not peer_reason:
        why = "forced by DEEP_EP_INTERNODE_TRANSPORT=peer: " if request == "peer" else ""
        return True, (f"{why}{num_nodes} nodes x {P} ranks on one host: internode kernels over peer memory "
                      "(virtual nodes)"), "peer", facts
    if request == "peer":
        return False, f"DEEP_EP_INTERNODE_TRANSPORT=peer but peer memory is not usable: {peer_reason}", "", []
    no_nv = [(p, f["nvshmem_reason"]) for p, f in enumerate(facts) if not f["nvshmem"]]
    if no_nv:
        return False, (f"peer memory is not usable ({peer_reason}) and NVSHMEM is not available: rank "
                       f"{no_nv[0][0]}: {no_nv[0][1]}") if request == "auto" else \
            f"DEEP_EP_INTERNODE_TRANSPORT=nvshmem but NVSHMEM is not available: rank {no_nv[0][0]}: {no_nv[0][1]}", \
            "", []
    bad_node = [(p, why) for p, (_, (ok, why)) in enumerate(reach) if not ok]
    if bad_node:
        return False, (f"rank {bad_node[0][0]} cannot map the NVL buffers of its node: {bad_node[0][1]}"), "", []
    over = "NVSHMEM"
    if not single_host:  # the transport NVSHMEM will use between hosts (the same environment rule on every rank)
        remotes = [tuple(f["nvshmem_remote"]) for f in facts]
        bad = [(p, problem) for p, (_, problem) in enumerate(remotes) if problem]
        if bad:
            return False, f"the NVSHMEM transport between hosts is not usable: rank {bad[0][0]}: {bad[0][1]}", "", []
        if len({name for name, _ in remotes}) > 1:
            return False, ("the NVSHMEM transport between hosts differs between ranks ("
                           + ", ".join(f"rank {p}: {name}" for p, (name, _) in enumerate(remotes))
                           + "); set the same NVSHMEM_IB_ENABLE_IBGDA / NVSHMEM_REMOTE_TRANSPORT on every rank"), "", []
        over = f"NVSHMEM ({remotes[0][0]})"
    why = "forced by DEEP_EP_INTERNODE_TRANSPORT=nvshmem: " if request == "nvshmem" else ""
    return True, (f"{why}{num_nodes} nodes x {P} ranks: internode kernels, RDMA hop over {over}, NVLink hop "
                  "over CUDA IPC"), "nvshmem", facts


def torch_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int):
    """`get_dispatch_layout` in torch ops that need no CPU sync (CUDA-graph safe): the layout kernel of the
    core handles at most 8 ranks, so groups beyond that use this. Same outputs as the kernel (and as
    docs/semantics.md): ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
    is_token_in_rank)``."""
    num_tokens = topk_idx.size(0)
    valid = topk_idx >= 0
    experts_per_rank = num_experts // num_ranks
    # -1 goes to an extra column / bin that is cut off (no boolean indexing: that would sync).
    dst = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    in_rank = torch.zeros((num_tokens, num_ranks + 1), dtype=torch.bool, device=topk_idx.device)
    in_rank.scatter_(1, dst, True)
    is_token_in_rank = in_rank[:, :num_ranks].contiguous()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    per_expert.scatter_add_(0, torch.where(valid, topk_idx, torch.full_like(topk_idx, num_experts)).view(-1),
                            torch.ones(topk_idx.numel(), dtype=torch.int32, device=topk_idx.device))
    num_nodes = num_ranks // num_ranks_per_node
    per_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks_per_node).any(-1).sum(0, dtype=_I32)
    return is_token_in_rank.sum(0, dtype=_I32), per_node, per_expert[:num_experts], is_token_in_rank


class CudaInternodeEngine(CudaEngine):
    """Normal-mode dispatch/combine across nodes with the compiled two-hop kernels.

    Args:
        comm: the Buffer's communicator.
        num_ranks_per_node: P (1 to 8); the group has ``R = P * num_nodes`` ranks, ``num_nodes >= 2``.
        num_nvl_bytes: bytes of the NVL region (rings between the ranks of a node).
        num_rdma_bytes: bytes of the RDMA region (count exchange, barrier words, rings between nodes).
        timeout_s: bound of every device- and host-side wait (default ``DEEP_EP_TIMEOUT_S`` via comm).
    """

    name = "cuda"

    def __init__(self, comm: Communicator, num_ranks_per_node: int, num_nvl_bytes: int, num_rdma_bytes: int,
                 transport: str = "peer", timeout_s: Optional[float] = None, num_qps_per_rank: int = 1,
                 allow_nvlink: bool = True, allow_mnnvl: bool = False, single_host: bool = True,
                 nvshmem_heap_bytes: int = 0) -> None:
        if comm.size % num_ranks_per_node != 0 or comm.size // num_ranks_per_node < 2:
            raise ValueError(f"CudaInternodeEngine: {comm.size} ranks do not form >= 2 nodes of "
                             f"{num_ranks_per_node}")
        if transport not in TRANSPORTS:
            raise ValueError(f"CudaInternodeEngine: transport must be one of {TRANSPORTS}, got {transport!r}")
        self.num_ranks_per_node = num_ranks_per_node
        self.num_nodes = comm.size // num_ranks_per_node
        self.transport = transport
        self.nvl_region_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self._nv = None
        self._nv_ptr = 0
        # Test knob: the RDMA hop between nodes never takes NVSHMEM's load/store shortcut, so the network
        # code path (staged puts, quiet, atomic signals) runs even on one GPU.
        self._p2p_group = num_ranks_per_node if os.environ.get("DEEP_EP_INTERNODE_FORCE_NETWORK", "0") == "1" else 0
        node = comm.rank // num_ranks_per_node
        if transport == "peer":
            self._open(comm, num_nvl_bytes, num_nvl_bytes + num_rdma_bytes, timeout_s)
        else:
            self._open(comm, num_nvl_bytes, num_nvl_bytes, timeout_s,
                       members=range(node * num_ranks_per_node, (node + 1) * num_ranks_per_node))
        self._counter_forwarded = _core.limits()["num_host_counters"] - 1  # kCounterRdmaRecvTokens
        if transport == "nvshmem":
            try:
                self._open_nvshmem(num_qps_per_rank, allow_nvlink, allow_mnnvl, single_host,
                                   max(nvshmem_heap_bytes, num_rdma_bytes))
            except BaseException:
                super().destroy(collective=False)
                raise

    def _open_nvshmem(self, num_qps_per_rank: int, allow_nvlink: bool, allow_mnnvl: bool, single_host: bool,
                      heap_bytes: int) -> None:
        """NVSHMEM world over the group, the symmetric RDMA region, and the pointers every launch passes."""
        nv = _core.load_nvshmem()
        if nv is None:
            raise _core.CoreError(_core.nvshmem_load_error() or "libdeep_ep_nvshmem.so is not available")
        self._nv = nv
        _nvshmem.apply_env_defaults(num_qps_per_rank, allow_nvlink, allow_mnnvl, single_host, heap_bytes)
        _nvshmem.bootstrap(self.comm, nv, self.device.index or 0)
        self._nv_ptr = nv.alloc(self.num_rdma_bytes)
        self._nvl_peers = [self._lib.runtime_peer_ptr(self._rt, peer=j) for j in range(self.num_ranks_per_node)]
        self._device_counters = self._lib.runtime_device_counters(self._rt)

    def destroy(self, collective: bool = True) -> None:
        """Free both regions (collective: waits for this GPU and every rank first; NVSHMEM's free and
        finalize are collective too)."""
        super().destroy(collective)
        if self._nv is not None and self._nv_ptr:
            ptr, self._nv_ptr = self._nv_ptr, 0
            if collective:
                self._nv.free(ptr)
                self._nv.finalize()

    # ---------------------------------------------------------------------------------- helpers
    def _call(self, op: int, num_channels: int, config: Optional[Config], combine: bool) -> _core.InternodeCall:
        if config is None:
            config = (get_combine_config if combine else get_dispatch_config)(self.num_ranks, 2)
        c = _core.InternodeCall()
        c.op = op
        c.rank, c.num_ranks, c.num_ranks_per_node = self.rank, self.num_ranks, self.num_ranks_per_node
        c.num_channels = num_channels
        c.num_rdma_slots = config.num_max_rdma_chunked_recv_tokens
        c.num_nvl_slots = config.num_max_nvl_chunked_recv_tokens
        c.num_max_rdma_send = config.num_max_rdma_chunked_send_tokens
        c.num_max_nvl_send = config.num_max_nvl_chunked_send_tokens
        c.expert_alignment = 1
        c.device = self.device.index or 0
        c.nvshmem_p2p_group = self._p2p_group
        return c

    def _launch(self, call: _core.InternodeCall, what: str) -> None:
        if self.transport == "peer":
            self._lib.internode_launch(self._rt, call, self.nvl_region_bytes, self._stream())
            return
        # NVSHMEM: the same checks and set-up deep_ep_internode_launch does for peer memory.
        rdma, nvl = self.layout_bytes(call)
        op = "combine" if call.op == _core.INTERNODE_COMBINE else "dispatch"
        if nvl > self.nvl_region_bytes:
            raise RuntimeError(f"deep_ep: the internode {op} needs {nvl} bytes of NVLink buffer, but the Buffer has "
                               f"num_nvl_bytes={self.nvl_region_bytes}; allocate more or use a config with fewer SMs "
                               "/ smaller num_max_nvl_chunked_recv_tokens")
        if rdma > self.num_rdma_bytes:
            raise RuntimeError(f"deep_ep: the internode {op} needs {rdma} bytes of RDMA buffer, but the Buffer has "
                               f"num_rdma_bytes={self.num_rdma_bytes}; allocate more (Config.get_rdma_buffer_size_hint)"
                               " or use a config with fewer SMs / smaller num_max_rdma_chunked_recv_tokens")
        call.rdma_local = self._nv_ptr
        for j, p in enumerate(self._nvl_peers):
            call.nvl_peers[j] = p
        call.host_counters = self._device_counters
        call.timeout_ns = int(self.timeout_s * 1e9)
        if call.op == _core.INTERNODE_NOTIFY and call.num_worst_tokens == 0:
            self._lib.runtime_reset_recv_counters(self._rt, call.num_experts // self.num_ranks)
        self._nv.internode_launch(call, self._stream())

    def layout_bytes(self, call: _core.InternodeCall) -> Tuple[int, int]:
        """``(rdma_bytes, nvl_bytes)`` the call's layout needs."""
        return self._lib.internode_layout_bytes(call)

    # ------------------------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        if self.num_ranks > MAX_RANKS_PER_NODE:  # beyond the layout kernel's 8 ranks
            self._enter(topk_idx)
            return torch_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)
        per_rank, _, per_expert, in_rank = super().get_dispatch_layout(topk_idx, num_experts)
        num_tokens = in_rank.size(0)
        per_node = in_rank.view(num_tokens, self.num_nodes, self.num_ranks_per_node).any(-1).sum(0, dtype=_I32)
        return per_rank, per_node, per_expert, in_rank

    # ---------------------------------------------------------------------------------- dispatch
    def _set_x(self, c: _core.InternodeCall, x: torch.Tensor, x_scales: Optional[torch.Tensor]) -> None:
        c.x = _ptr(x)
        c.num_tokens = x.size(0)
        c.row_bytes = x.size(1) * x.element_size()
        if x_scales is not None:
            c.x_scales = _ptr(x_scales)
            c.num_scales = x_scales.size(1)
            c.scale_token_stride, c.scale_hidden_stride = x_scales.stride(0), x_scales.stride(1)

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], is_token_in_rank: torch.Tensor,
                 num_tokens_per_expert: torch.Tensor, expert_alignment: int, num_worst_tokens: int,
                 num_channels: int, config: Optional[Config] = None):
        self._enter(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert)
        R, P, NN, C, dev = self.num_ranks, self.num_ranks_per_node, self.num_nodes, num_channels, self.device
        x = x.contiguous()
        is_token_in_rank = is_token_in_rank.contiguous()
        num_tokens_per_expert = num_tokens_per_expert.contiguous()
        num_tokens, hidden = x.shape
        num_experts = num_tokens_per_expert.numel()
        num_local_experts = num_experts // R
        if topk_idx is not None:
            topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()
        num_topk = topk_idx.size(1) if topk_idx is not None else 0

        rdma_channel_prefix_matrix = torch.empty((NN, C), dtype=_I32, device=dev)
        gbl_channel_prefix_matrix = torch.empty((R, C), dtype=_I32, device=dev)
        recv_rdma_channel_prefix_matrix = torch.empty((NN, C), dtype=_I32, device=dev)
        recv_rdma_rank_prefix_sum = torch.empty(NN, dtype=_I32, device=dev)
        recv_gbl_channel_prefix_matrix = torch.empty((R, C), dtype=_I32, device=dev)
        recv_gbl_rank_prefix_sum = torch.empty(R, dtype=_I32, device=dev)

        c = self._call(_core.INTERNODE_NOTIFY, C, config, combine=False)
        self._set_x(c, x, x_scales)
        c.num_experts, c.num_topk = num_experts, num_topk
        c.expert_alignment, c.num_worst_tokens = expert_alignment, num_worst_tokens
        c.is_token_in_rank = _ptr(is_token_in_rank)
        c.num_tokens_per_expert = _ptr(num_tokens_per_expert)
        c.rdma_channel_prefix_matrix = _ptr(rdma_channel_prefix_matrix)
        c.gbl_channel_prefix_matrix = _ptr(gbl_channel_prefix_matrix)
        c.recv_rdma_channel_prefix_matrix = _ptr(recv_rdma_channel_prefix_matrix)
        c.recv_rdma_rank_prefix_sum = _ptr(recv_rdma_rank_prefix_sum)
        c.recv_gbl_channel_prefix_matrix = _ptr(recv_gbl_channel_prefix_matrix)
        c.recv_gbl_rank_prefix_sum = _ptr(recv_gbl_rank_prefix_sum)
        stream = self._stream()
        self._launch(c, "internode notify")

        if num_worst_tokens > 0:
            self._note_worst_notify(num_worst_tokens)
            num_rows, nvl_rows, count_list = num_worst_tokens, P * num_worst_tokens, []
        else:
            arrived, values = self._lib.runtime_wait_recv_counters(self._rt, stream, num_local_experts)
            if not arrived:
                raise RuntimeError(
                    f"deep_ep.Buffer.dispatch: timeout ({self.timeout_s:g} s, DEEP_EP_TIMEOUT_S) on rank {self.rank} "
                    f"waiting for the receive counts of the internode notify kernel: received tokens = {values[0]}, "
                    f"per local expert = {values[1:]} (-1 = not written): a peer did not enter the dispatch")
            forwarded = self._lib.runtime_host_counter(self._rt, self._counter_forwarded)
            num_rows, nvl_rows = values[0], forwarded
            count_list = values[1:]

        recv_x = torch.empty((num_rows, hidden), dtype=x.dtype, device=dev)
        recv_scales = None
        if x_scales is not None:
            recv_scales = torch.empty((num_rows, x_scales.size(1)), dtype=x_scales.dtype, device=dev)
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = torch.empty((num_rows, num_topk), dtype=torch.int64, device=dev)
            recv_topk_weights = torch.empty((num_rows, num_topk), dtype=torch.float32, device=dev)
        recv_src_meta = torch.empty((num_rows, 8), dtype=torch.uint8, device=dev)
        send_rdma_head = torch.empty((num_tokens, NN), dtype=_I32, device=dev)
        send_nvl_head = torch.empty((nvl_rows, P), dtype=_I32, device=dev)

        c.op = _core.INTERNODE_DISPATCH
        c.topk_idx, c.topk_weights = _ptr(topk_idx), _ptr(topk_weights)
        c.num_recv_rows = num_rows
        c.fill_trailing_rows = int(num_worst_tokens > 0)
        c.recv_x, c.recv_x_scales = _ptr(recv_x), _ptr(recv_scales)
        c.recv_topk_idx, c.recv_topk_weights = _ptr(recv_topk_idx), _ptr(recv_topk_weights)
        c.recv_src_meta = _ptr(recv_src_meta)
        c.send_rdma_head = _ptr(send_rdma_head)
        c.send_nvl_head, c.send_nvl_head_rows = _ptr(send_nvl_head), nvl_rows
        self._launch(c, "internode dispatch")

        handle = (is_token_in_rank, rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
                  recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix,
                  recv_gbl_rank_prefix_sum, recv_src_meta, send_rdma_head, send_nvl_head)
        recv_x_out = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv_x_out, recv_topk_idx, recv_topk_weights, count_list, handle

    def _set_handle(self, c: _core.InternodeCall, handle: tuple) -> List[torch.Tensor]:
        """Routing fields of a 10-tuple handle into the call; returns the contiguous tensors (kept alive)."""
        keep = [t.contiguous() for t in handle]
        (c.is_token_in_rank, c.rdma_channel_prefix_matrix, c.gbl_channel_prefix_matrix,
         c.recv_rdma_channel_prefix_matrix, c.recv_rdma_rank_prefix_sum, c.recv_gbl_channel_prefix_matrix,
         c.recv_gbl_rank_prefix_sum) = [_ptr(t) for t in keep[:7]]
        return keep

    # --------------------------------------------------------------------------- cached dispatch
    def cached_dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: tuple,
                        config: Optional[Config] = None):
        self._enter(x, x_scales, handle[0], handle[6])
        x = x.contiguous()
        num_rows = handle[7].size(0)
        c = self._call(_core.INTERNODE_DISPATCH, handle[1].size(1), config, combine=False)
        keep = self._set_handle(c, handle)
        self._set_x(c, x, x_scales)
        recv_x = torch.empty((num_rows, x.size(1)), dtype=x.dtype, device=self.device)
        recv_scales = None
        if x_scales is not None:
            recv_scales = torch.empty((num_rows, x_scales.size(1)), dtype=x_scales.dtype, device=self.device)
        c.cached = 1
        c.num_recv_rows = num_rows
        c.fill_trailing_rows = 1  # the received count is known only on the device
        c.recv_x, c.recv_x_scales = _ptr(recv_x), _ptr(recv_scales)
        self._launch(c, "internode cached dispatch")
        del keep
        return (recv_x, recv_scales) if x_scales is not None else recv_x

    # ----------------------------------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor],
                bias: Sequence[torch.Tensor], config: Optional[Config] = None):
        self._enter(x, topk_weights, handle[8], handle[9], *bias)
        x = x.contiguous()
        num_tokens, hidden = handle[0].size(0), x.size(1)
        c = self._call(_core.INTERNODE_COMBINE, handle[1].size(1), config, combine=True)
        keep = self._set_handle(c, handle)
        c.send_rdma_head, c.send_nvl_head = _ptr(keep[8]), _ptr(keep[9])
        c.send_nvl_head_rows = keep[9].size(0)
        c.x = _ptr(x)
        c.num_tokens = num_tokens
        c.row_bytes = hidden * x.element_size()
        c.num_recv_rows = x.size(0)
        if topk_weights is not None:
            topk_weights = topk_weights.contiguous()
            c.topk_weights, c.num_topk = _ptr(topk_weights), topk_weights.size(1)
        biases = [b.contiguous() for b in bias] + [None, None]
        c.bias_0, c.bias_1 = _ptr(biases[0]), _ptr(biases[1])
        combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self.device)
        combined_w = None
        if topk_weights is not None:
            combined_w = torch.empty((num_tokens, topk_weights.size(1)), dtype=torch.float32, device=self.device)
        c.recv_x, c.recv_topk_weights = _ptr(combined_x), _ptr(combined_w)
        self._launch(c, "internode combine")
        del keep
        return combined_x, combined_w
