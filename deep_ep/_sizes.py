"""The buffer-size rules, the same on every engine.

Normal mode (DeepEP V1's rule): a call needs ``num_nvl_bytes >= config.get_nvl_buffer_size_hint(hidden_bytes,
num_ranks)`` (across nodes: ``..., num_ranks_per_node=P)``), with ``hidden_bytes = hidden * max(element
size, 2)`` and the call's config (the default one when None). Across nodes (``Buffer.num_nodes > 1``, also
virtual nodes through ``DEEP_EP_RANKS_PER_NODE``) it needs as well ``num_rdma_bytes >=
config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=P)``, the RDMA region of the
two-hop kernels (without it the CUDA internode engine is not chosen, with less its launch fails).

Low-latency mode: a call needs ``num_rdma_bytes`` >= the layout's bytes, which
``Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)``
covers (the CUDA low-latency engine places that layout in the buffer).

The CUDA kernels never need more than the hints (``tests/test_core_host*.py``); the portable engine moves
no data through these buffers (it allocates them only when read: `LocalBuffers`) but applies the rules too,
so that a program tested on CPU neither fails on a GPU nor falls back there to the slower engine because
its buffer is too small. Each rank checks its own arguments before any collective: with the same
arguments every rank raises alike.
"""

from __future__ import annotations

from .config import Config, LowLatencyLayout

__all__ = ["check_normal_buffer", "check_low_latency_buffer"]

_EVERY_ENGINE = "on every engine (CPU and GPU alike)"


def check_normal_buffer(where: str, num_nvl_bytes: int, hidden_bytes: int, num_ranks: int,
                        num_ranks_per_node: int, config: Config, config_name: str,
                        num_rdma_bytes: int | None = None) -> None:
    """Raise ValueError naming the size hint to call when the Buffer is too small for this call.

    Args:
        where: the public method (``deep_ep.Buffer.dispatch``).
        hidden_bytes: ``hidden * max(x.element_size(), 2)`` (DeepEP's).
        config: the call's config.
        config_name: how the caller gets that config, e.g. ``Buffer.get_dispatch_config(8)``.
        num_rdma_bytes: the Buffer's RDMA bytes, checked across nodes (``num_ranks_per_node < num_ranks``);
            None skips that check.
    """
    multi_node = num_ranks_per_node < num_ranks
    per_node = num_ranks_per_node if multi_node else None
    extra = f", num_ranks_per_node={num_ranks_per_node}" if multi_node else ""
    hint_args = f"{hidden_bytes}, {num_ranks}{extra}"
    tail = ("(hidden_bytes = hidden * max(element size, 2); take the larger of the dispatch and combine configs' "
            "hints)")
    need = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=per_node)
    if num_nvl_bytes < need:
        raise ValueError(
            f"{where}: the Buffer has num_nvl_bytes={num_nvl_bytes}, this call needs {need} {_EVERY_ENGINE}: "
            f"create the Buffer with num_nvl_bytes >= {config_name}.get_nvl_buffer_size_hint({hint_args}) {tail}")
    if multi_node and num_rdma_bytes is not None:
        need = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=per_node)
        if num_rdma_bytes < need:
            raise ValueError(
                f"{where}: the Buffer has num_rdma_bytes={num_rdma_bytes}, this call across "
                f"{num_ranks // num_ranks_per_node} nodes needs {need} {_EVERY_ENGINE}: create the Buffer with "
                f"num_rdma_bytes >= {config_name}.get_rdma_buffer_size_hint({hint_args}) {tail}")


def check_low_latency_buffer(where: str, num_rdma_bytes: int, num_max_dispatch_tokens_per_rank: int, hidden: int,
                             num_ranks: int, num_experts: int) -> None:
    """Raise ValueError naming `Buffer.get_low_latency_rdma_size_hint` when the Buffer's RDMA bytes cannot
    hold the low-latency layout of this shape (the arguments are already checked)."""
    need = LowLatencyLayout(num_max_dispatch_tokens_per_rank, hidden, num_experts).total_bytes
    if num_rdma_bytes < need:
        raise ValueError(
            f"{where}: `num_rdma_bytes` is {num_rdma_bytes}, but the low-latency layout needs {need} bytes "
            f"{_EVERY_ENGINE}: create the Buffer with num_rdma_bytes >= Buffer.get_low_latency_rdma_size_hint("
            f"{num_max_dispatch_tokens_per_rank}, {hidden}, {num_ranks}, {num_experts})")
