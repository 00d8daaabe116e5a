"""Every environment variable deep_ep reads, in one place (all listed in the README)."""

import os
from typing import Optional

__all__ = ["timeout_s", "ranks_per_node_override", "engine_override", "store_addr_override", "cpu_threads_override",
           "transport_override", "shm_wait"]


def _int_env(name: str, default: Optional[int]) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"deep_ep: environment variable {name} must be an integer, got {value!r}") from None


def timeout_s() -> float:
    """``DEEP_EP_TIMEOUT_S`` (default 100): seconds a collective may wait for its peers before it raises."""
    value = os.environ.get("DEEP_EP_TIMEOUT_S")
    if value is None or value == "":
        return 100.0
    try:
        result = float(value)
    except ValueError:
        raise ValueError(f"deep_ep: environment variable DEEP_EP_TIMEOUT_S must be a number, got {value!r}") from None
    if result <= 0:
        raise ValueError(f"deep_ep: environment variable DEEP_EP_TIMEOUT_S must be positive, got {value!r}")
    return result


def ranks_per_node_override() -> Optional[int]:
    """``DEEP_EP_RANKS_PER_NODE``: ranks per node, instead of detecting ranks that share a host."""
    value = _int_env("DEEP_EP_RANKS_PER_NODE", None)
    if value is not None and value <= 0:
        raise ValueError(f"deep_ep: DEEP_EP_RANKS_PER_NODE must be positive, got {value}")
    return value


def engine_override() -> Optional[str]:
    """``DEEP_EP_ENGINE``: ``portable`` or ``cuda`` forces an engine, ``emulated`` runs the CUDA engine's
    kernels on CPU tensors through the kernel emulator (deep_ep.engines.emulated); unset means automatic."""
    value = os.environ.get("DEEP_EP_ENGINE", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("portable", "cuda", "emulated"):
        raise ValueError(f"deep_ep: DEEP_EP_ENGINE must be 'portable', 'cuda', 'emulated' or 'auto', got {value!r}")
    return value


def store_addr_override() -> Optional[str]:
    """``DEEP_EP_STORE_ADDR``: address rank 0 listens on for deep_ep's own rendezvous when ranks span
    several hosts (default: ``MASTER_ADDR`` if set, else rank 0's host name). Single-host runs always
    use 127.0.0.1."""
    value = os.environ.get("DEEP_EP_STORE_ADDR") or os.environ.get("MASTER_ADDR")
    return value or None


def cpu_threads_override() -> Optional[int]:
    """``DEEP_EP_CPU_THREADS``: torch intra-op threads inside deep_ep's CPU calls (default: the host's cores
    divided by the ranks on it, at least 1; ``0``: leave the caller's setting alone)."""
    value = _int_env("DEEP_EP_CPU_THREADS", None)
    if value is not None and value < 0:
        raise ValueError(f"deep_ep: DEEP_EP_CPU_THREADS must be >= 0, got {value}")
    return value


def transport_override() -> Optional[str]:
    """``DEEP_EP_TRANSPORT``: ``gloo`` forces the gloo transport for CPU tensors, ``shm`` requires the
    same-host shared-memory one (an error when it cannot be set up); unset or ``auto``: shared memory
    when every rank runs on this host and it can be set up, else gloo."""
    value = os.environ.get("DEEP_EP_TRANSPORT", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("gloo", "shm"):
        raise ValueError(f"deep_ep: DEEP_EP_TRANSPORT must be 'gloo', 'shm' or 'auto', got {value!r}")
    return value


def shm_wait() -> str:
    """``DEEP_EP_SHM_WAIT``: how the same-host shared-memory transport waits for its peers: ``futex``
    (default: sleep on a doorbell word the peers ring) or ``sleep`` (poll with growing sleeps)."""
    value = os.environ.get("DEEP_EP_SHM_WAIT", "").strip().lower()
    if value in ("", "futex"):
        return "futex"
    if value != "sleep":
        raise ValueError(f"deep_ep: DEEP_EP_SHM_WAIT must be 'futex' or 'sleep', got {value!r}")
    return value
