"""deep_ep: expert-parallel dispatch/combine for Mixture-of-Experts models (DeepEP V1 API).

    >>> import deep_ep
    >>> buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 30)
"""

from ._comm import CommError
from .buffer import Buffer, topk_idx_t
from .config import Config
from .utils import EventHandle, EventOverlap

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "CommError", "EventOverlap", "EventHandle", "topk_idx_t", "__version__"]
