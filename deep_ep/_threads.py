"""Thread capping for deep_ep's CPU work: the ranks of one host share its cores.

torch's default intra-op thread count is the number of cores, per process. With several ranks on one
host that oversubscribes the cores (4 ranks with 2 threads each on 2 cores measured 7-11x slower
combines), and users do not set the thread count. Inside each CPU call, deep_ep therefore lowers
torch's intra-op threads to ``cores / local ranks`` (at least 1) and restores the caller's setting
afterwards; ``DEEP_EP_CPU_THREADS`` sets the cap explicitly (``0`` disables capping).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["ThreadCap", "cores_available"]


def cores_available() -> int:
    """Cores this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ThreadCap:
    """Re-entrant context manager: caps torch's intra-op threads to `limit` while inside.

    Args:
        limit: the cap; None or 0 disables it (the context manager then does nothing).
    """

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = int(limit) if limit else 0
        self._saved = []

    @classmethod
    def for_local_ranks(cls, num_local_ranks: int, override: Optional[int] = None) -> "ThreadCap":
        """The cap for `num_local_ranks` ranks sharing this host's cores (`override`: the env value)."""
        if override is not None:
            return cls(override)
        return cls(max(1, cores_available() // max(1, num_local_ranks)))

    def __enter__(self) -> "ThreadCap":
        prev = 0
        if self.limit:
            prev = torch.get_num_threads()
            if prev > self.limit:
                torch.set_num_threads(self.limit)
            else:
                prev = 0
        self._saved.append(prev)
        return self

    def __exit__(self, *exc) -> None:
        prev = self._saved.pop()
        if prev:
            torch.set_num_threads(prev)

    def wrap(self, fn):
        """`fn` run under this cap (for hooks that do CPU work after the call returned)."""
        if fn is None or not self.limit:
            return fn

        def capped(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        capped.__doc__ = getattr(fn, "__doc__", None)
        return capped
