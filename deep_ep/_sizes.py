"""The buffer-size rule of normal-mode dispatch and combine, the same on every engine.

DeepEP V1's rule: a normal-mode call needs ``num_nvl_bytes >= config.get_nvl_buffer_size_hint(hidden_bytes,
num_ranks)`` (across nodes: ``..., num_ranks_per_node=P)``), with ``hidden_bytes = hidden * max(element
size, 2)`` and the call's config (the default one when None). The CUDA kernels never need more than that
(``tests/test_core_host*.py``); the portable engine moves no data through these buffers but applies
the rule too, so that a program tested on CPU neither fails on a GPU nor falls back there to the
slower engine because its buffer is too small. Each rank checks its own arguments before any
collective: with the same arguments every rank raises alike.

Not covered yet: ``num_rdma_bytes`` across nodes (the CUDA internode engine needs
``Config.get_rdma_buffer_size_hint(..., num_ranks_per_node=P)``; with less it is not chosen and
``buffer.engine_reason`` says so, while the portable engine runs with any value).
"""

from __future__ import annotations

from .config import Config

__all__ = ["check_normal_buffer"]


def check_normal_buffer(where: str, num_nvl_bytes: int, hidden_bytes: int, num_ranks: int,
                        num_ranks_per_node: int, config: Config, config_name: str) -> None:
    """Raise ValueError naming the size hint to call when the Buffer is too small for this call.

    Args:
        where: the public method (``deep_ep.Buffer.dispatch``).
        hidden_bytes: ``hidden * max(x.element_size(), 2)`` (DeepEP's).
        config: the call's config.
        config_name: how the caller gets that config, e.g. ``Buffer.get_dispatch_config(8)``.
    """
    multi_node = num_ranks_per_node < num_ranks
    per_node = num_ranks_per_node if multi_node else None
    extra = f", num_ranks_per_node={num_ranks_per_node}" if multi_node else ""
    need = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=per_node)
    if num_nvl_bytes < need:
        raise ValueError(
            f"{where}: the Buffer has num_nvl_bytes={num_nvl_bytes}, this call needs {need} on every engine (CPU "
            f"and GPU alike): create the Buffer with num_nvl_bytes >= {config_name}.get_nvl_buffer_size_hint("
            f"{hidden_bytes}, {num_ranks}{extra}) (hidden_bytes = hidden * max(element size, 2); take the larger of "
            f"the dispatch and combine configs' hints)")
