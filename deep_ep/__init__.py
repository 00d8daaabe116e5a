"""deep_ep: expert-parallel dispatch/combine for Mixture-of-Experts models (DeepEP V1 API).

    >>> import deep_ep
    >>> hint = deep_ep.Buffer.get_dispatch_config(group.size()).get_nvl_buffer_size_hint(hidden * 2, group.size())
    >>> buffer = deep_ep.Buffer(group, num_nvl_bytes=hint)

Size the buffers with the hints (``Config.get_nvl_buffer_size_hint``, ``get_rdma_buffer_size_hint``,
``Buffer.get_low_latency_rdma_size_hint``), not DeepEP's test defaults of 1-2 GB. README.md and
docs/api.md describe the API.
"""

from ._comm import CommError
from .buffer import Buffer, topk_idx_t
from .config import Config
from .utils import EventHandle, EventOverlap

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "CommError", "EventOverlap", "EventHandle", "topk_idx_t", "__version__"]
