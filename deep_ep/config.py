"""`Config` for the normal kernels, DeepEP V1's default config tables, and buffer size hints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["Config", "LowLatencyLayout", "get_dispatch_config", "get_combine_config",
           "get_low_latency_rdma_size_hint"]

# DeepEP's NVLink domain assumption, used only by the size-hint formulas (kept for compatibility:
# callers size buffers from these numbers).
_HINT_NVL_PEERS = 8
_HINT_MAX_TOPK = 128
_HINT_MAX_SCALES = 128
_TOPK_IDX_BYTES = 8
_SOURCE_META_BYTES = 8
_ALIGN = 128


def _align(x: int, a: int = _ALIGN) -> int:
    return (x + a - 1) // a * a


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"deep_ep.Config: `{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"deep_ep.Config: `{name}` must be >= {minimum}, got {value}")
    return value


class Config:
    """Chunking configuration of the normal (high-throughput) kernels.

    Args:
        num_sms: blocks the normal kernels use; must be even (one channel = two SMs), so the number of
            channels is ``num_sms // 2``. Also sets the channel split of the handle's prefix matrices.
        num_max_nvl_chunked_send_tokens: tokens moved per NVLink chunk (< the receive capacity).
        num_max_nvl_chunked_recv_tokens: NVLink ring capacity in tokens per channel and peer.
        num_max_rdma_chunked_send_tokens: tokens per RDMA chunk (<= half the RDMA ring capacity).
        num_max_rdma_chunked_recv_tokens: RDMA ring capacity; rounded up to a multiple of the send chunk.
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        _check_int("num_sms", num_sms, 2)
        if num_sms % 2 != 0:
            raise ValueError(f"deep_ep.Config: `num_sms` must be even (one channel = two SMs), got {num_sms}")
        _check_int("num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens, 1)
        _check_int("num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens, 1)
        _check_int("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens, 1)
        _check_int("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens, 1)
        if num_max_nvl_chunked_send_tokens >= num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "deep_ep.Config: `num_max_nvl_chunked_send_tokens` must be < `num_max_nvl_chunked_recv_tokens`, "
                f"got {num_max_nvl_chunked_send_tokens} >= {num_max_nvl_chunked_recv_tokens}")
        if num_max_rdma_chunked_send_tokens >= num_max_rdma_chunked_recv_tokens:
            raise ValueError(
                "deep_ep.Config: `num_max_rdma_chunked_send_tokens` must be < `num_max_rdma_chunked_recv_tokens`, "
                f"got {num_max_rdma_chunked_send_tokens} >= {num_max_rdma_chunked_recv_tokens}")
        # Round the RDMA ring up to whole chunks; the lazy head update needs room for a full chunk.
        rdma_recv = _align(num_max_rdma_chunked_recv_tokens, num_max_rdma_chunked_send_tokens)
        if num_max_rdma_chunked_send_tokens > rdma_recv // 2:
            raise ValueError(
                "deep_ep.Config: `num_max_rdma_chunked_send_tokens` must be <= half of "
                f"`num_max_rdma_chunked_recv_tokens` (lazy head updates), got {num_max_rdma_chunked_send_tokens} "
                f"and {rdma_recv}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    @property
    def num_channels(self) -> int:
        """Channels of the normal kernels (``num_sms // 2``)."""
        return self.num_sms // 2

    def _internode_bytes(self, hidden_bytes: int, num_ranks: int, num_ranks_per_node: int) -> Tuple[int, int]:
        """(NVL, RDMA) bytes deep_ep's two-hop kernels need at most (csrc/kernels/internode_layout.cuh, with
        top-k 32, 128 scale columns and 4096 experts per rank as the bounds)."""
        if num_ranks % num_ranks_per_node != 0:
            raise ValueError(f"deep_ep.Config: num_ranks_per_node={num_ranks_per_node} does not divide "
                             f"num_ranks={num_ranks}")
        C, P, R = self.num_channels, num_ranks_per_node, num_ranks
        NN = R // P
        K, S, E_loc = 32, _HINT_MAX_SCALES, 4096
        msg = hidden_bytes + _align(4 * (2 + 2 * K + S), 16)
        words = _align(2 * C + R + E_loc, 4)
        Qr = self.num_max_rdma_chunked_recv_tokens
        # sync words and heads: uint64; tail words: one uint64 per ring slot; send staging + recv ring
        rdma = (_align((R + 1) * 8) + 2 * _align(R * words * 4) + _align(C * NN * 8) + _align(C * NN * Qr * 8)
                + 2 * _align(C * NN * Qr * msg))
        nvl = 2 * _align(C * P * 4) + _align(C * P * self.num_max_nvl_chunked_recv_tokens * msg)
        return nvl, rdma

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                 num_ranks_per_node: Optional[int] = None) -> int:
        """Bytes of NVLink buffer DeepEP V1's normal kernels would need (same formula, an upper bound).

        ``num_ranks_per_node`` (deep_ep extension): with fewer ranks per node than ``num_ranks`` (several
        nodes, any P from 1 to 8), the bytes deep_ep's two-hop kernels need at most instead.
        """
        _check_int("hidden_bytes", hidden_bytes, 0)
        _check_int("num_ranks", num_ranks, 1)
        if num_ranks_per_node is not None:
            _check_int("num_ranks_per_node", num_ranks_per_node, 1)
            if num_ranks_per_node < num_ranks:
                return self._internode_bytes(hidden_bytes, num_ranks, num_ranks_per_node)[0]
        num_nvl_ranks = min(num_ranks, _HINT_NVL_PEERS)
        num_rdma_ranks = max(num_ranks // _HINT_NVL_PEERS, 1)
        ch = self.num_channels
        per_token = (hidden_bytes + _SOURCE_META_BYTES + _HINT_MAX_TOPK * _TOPK_IDX_BYTES
                     + _HINT_MAX_TOPK * 4 + _HINT_MAX_SCALES * 4)
        total = (ch * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
                 + ch * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens * per_token)
        return _align(total)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                  num_ranks_per_node: Optional[int] = None) -> int:
        """Bytes of RDMA buffer DeepEP V1's internode kernels would need; 0 for <= 8 ranks.

        ``num_ranks_per_node`` (deep_ep extension): with fewer ranks per node than ``num_ranks``, the bytes
        deep_ep's two-hop kernels need at most (e.g. 2 nodes x 2 ranks, which DeepEP's formula sizes as 0).
        """
        _check_int("hidden_bytes", hidden_bytes, 0)
        _check_int("num_ranks", num_ranks, 1)
        if num_ranks_per_node is not None:
            _check_int("num_ranks_per_node", num_ranks_per_node, 1)
            if num_ranks_per_node < num_ranks:
                return self._internode_bytes(hidden_bytes, num_ranks, num_ranks_per_node)[1]
        if num_ranks <= _HINT_NVL_PEERS:
            return 0
        num_rdma_ranks = num_ranks // _HINT_NVL_PEERS
        ch = self.num_channels
        per_token = (hidden_bytes + _SOURCE_META_BYTES + _HINT_MAX_TOPK * _TOPK_IDX_BYTES
                     + _HINT_MAX_TOPK * 4 + _HINT_MAX_SCALES * 4 + 16)
        total = (ch * num_rdma_ranks * (_HINT_NVL_PEERS * 2 + 2) * 2 * 4
                 + ch * num_rdma_ranks * self.num_max_rdma_chunked_recv_tokens * per_token * 2)
        return _align(total)

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
                f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
                f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
                f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})")

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


# DeepEP V1's tuned defaults: ranks -> (nvl_send, nvl_recv, rdma_send, rdma_recv).
_DISPATCH_TABLE = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_TABLE = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _table_entry(table, num_ranks: int, what: str):
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"deep_ep.Buffer.{what}: `num_ranks` must be a positive int, got {num_ranks!r}")
    if num_ranks in table:
        return table[num_ranks]
    # Sizes DeepEP has no table entry for (any rank count works here): the next larger entry,
    # or the largest one beyond 160 ranks.
    larger = [k for k in sorted(table) if k >= num_ranks]
    return table[larger[0] if larger else max(table)]


def get_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return Config(num_sms, *_table_entry(_DISPATCH_TABLE, num_ranks, "get_dispatch_config"))


def get_combine_config(num_ranks: int, num_sms: int) -> Config:
    return Config(num_sms, *_table_entry(_COMBINE_TABLE, num_ranks, "get_combine_config"))


@dataclass(frozen=True)
class LowLatencyLayout:
    """DeepEP V1's low-latency RDMA buffer layout: ``[sig0][sig1][send0][send1][recv0][recv1]``.

    All sizes in bytes. The combine send area of slot ``i`` starts at ``send_offset(i)`` and holds
    ``[E_local, num_ranks * T, combine_msg]``. Every region is rounded up to 128 bytes (DeepEP's sizes
    are not: ``E * T`` combine messages of ``260 * hidden / 128`` bytes need not be a multiple of 16,
    which would misalign the next region for the kernels' 16-byte accesses); the two layouts agree
    whenever DeepEP's regions are multiples of 128, as in every common shape. The compiled kernels use
    the same layout (``csrc/kernels/low_latency.cuh``, compared by ``tests/test_core_host_ll.py``).
    """

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int

    @property
    def num_scales(self) -> int:
        return self.hidden // 128

    @property
    def dispatch_msg_bytes(self) -> int:
        return 16 + max(self.hidden * 2, self.hidden + self.num_scales * 4)

    @property
    def combine_msg_bytes(self) -> int:
        return self.num_scales * 4 + self.hidden * 2

    @property
    def signaling_bytes(self) -> int:
        return _align(self.num_experts * 4)

    @property
    def send_bytes(self) -> int:
        t, e = self.num_max_dispatch_tokens_per_rank, self.num_experts
        return _align(max(t * self.dispatch_msg_bytes, e * t * self.combine_msg_bytes))

    @property
    def recv_bytes(self) -> int:
        t, e = self.num_max_dispatch_tokens_per_rank, self.num_experts
        return _align(max(e * t * self.dispatch_msg_bytes, e * t * self.combine_msg_bytes))

    @property
    def total_bytes(self) -> int:
        return 2 * self.signaling_bytes + 2 * self.send_bytes + 2 * self.recv_bytes

    def signaling_offset(self, slot: int) -> int:
        return slot * self.signaling_bytes

    def send_offset(self, slot: int) -> int:
        return 2 * self.signaling_bytes + slot * self.send_bytes

    def recv_offset(self, slot: int) -> int:
        return 2 * self.signaling_bytes + 2 * self.send_bytes + slot * self.recv_bytes


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                   num_experts: int) -> int:
    """RDMA bytes the low-latency mode needs (DeepEP V1's formula; ``num_ranks`` does not enter it)."""
    for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
                        ("hidden", hidden), ("num_ranks", num_ranks), ("num_experts", num_experts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"deep_ep.Buffer.get_low_latency_rdma_size_hint: `{name}` must be a positive int, "
                             f"got {value!r}")
    if hidden % 128 != 0:  # low_latency_dispatch/combine reject such a hidden (FP8 blocks of 128)
        raise ValueError(f"deep_ep.Buffer.get_low_latency_rdma_size_hint: `hidden` must be a multiple of 128 (the "
                         f"low-latency mode's FP8 block), got {hidden}")
    total = LowLatencyLayout(num_max_dispatch_tokens_per_rank, hidden, num_experts).total_bytes
    # DeepEP rounds to the next multiple of 128 strictly above the total.
    return (total + _ALIGN) // _ALIGN * _ALIGN
