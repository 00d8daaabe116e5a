"""NVSHMEM set-up for the CUDA low-latency engine: environment defaults, the QP-depth rule, bootstrap.

Everything NVSHMEM reads from the environment is decided in ONE place, `apply_env_defaults`, which is
called once right before NVSHMEM is initialised and logs (logger ``deep_ep``, INFO) every variable it
changed. The rules follow DeepEP V1's ``Buffer.__init__`` (docs: ../shared/spec/deepep-v1-reference.md
§2.1), with two differences when every rank is on one host and P2P is allowed (no NIC needed): IBGDA
defaults to off and the remote transport to ``none``, so that NVSHMEM's P2P transport alone carries the traffic
(TESTING-ON-THESE-MACHINES.md §1.3). Variables the user already set are kept, except the ones that
mirror `Buffer` arguments (``allow_nvlink_for_low_latency_mode`` -> ``NVSHMEM_DISABLE_P2P``,
``num_qps_per_rank`` -> ``NVSHMEM_IBGDA_NUM_RC_PER_PE``, ``allow_mnnvl=False`` ->
``NVSHMEM_DISABLE_MNNVL=1``), which DeepEP also overwrites.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, MutableMapping, Optional, Tuple

__all__ = ["apply_env_defaults", "env_defaults", "qp_depth", "check_qp_depth", "bootstrap", "DEFAULT_QP_DEPTH",
           "remote_transport"]

log = logging.getLogger("deep_ep")

DEFAULT_QP_DEPTH = 1024
_GiB = 1 << 30
_CUMEM_GRANULARITY = 1 << 29  # "NVSHMEM initialization requires at least 256 MiB" (DeepEP uses 512 MiB)


def env_defaults(num_qps_per_rank: int, allow_nvlink: bool, allow_mnnvl: bool, single_host: bool,
                 num_rdma_bytes: int) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``(forced, defaults)``: the variables `apply_env_defaults` sets always / only when unset."""
    forced = {
        "NVSHMEM_DISABLE_P2P": "0" if allow_nvlink else "1",
        "NVSHMEM_IBGDA_NUM_RC_PER_PE": str(int(num_qps_per_rank)),
    }
    if not allow_mnnvl:
        forced["NVSHMEM_DISABLE_MNNVL"] = "1"
    # The symmetric heap must hold the LL buffer (NVSHMEM's default is 1 GiB); whole granules plus slack.
    heap = max(_GiB, (int(num_rdma_bytes) + 256 * (1 << 20) + _CUMEM_GRANULARITY - 1)
               // _CUMEM_GRANULARITY * _CUMEM_GRANULARITY)
    # Every rank on one host with P2P allowed: NVSHMEM's P2P transport carries everything, no NIC needed.
    p2p_only = single_host and allow_nvlink
    defaults = {
        "NVSHMEM_IB_ENABLE_IBGDA": "0" if p2p_only else "1",
        "NVSHMEM_QP_DEPTH": str(DEFAULT_QP_DEPTH),
        "NVSHMEM_MAX_TEAMS": "7",          # 6 default teams + 1 (DeepEP)
        "NVSHMEM_DISABLE_NVLS": "1",       # no NVLink SHARP; required with several PEs per GPU
        "NVSHMEM_CUMEM_GRANULARITY": str(_CUMEM_GRANULARITY),
        "NVSHMEM_SYMMETRIC_SIZE": str(heap),
    }
    if p2p_only:
        defaults.update({
            "NVSHMEM_REMOTE_TRANSPORT": "none",      # no NIC needed: P2P (NVLink / same GPU) only
            "NVSHMEM_DISABLE_NCCL": "1",
            "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
        })
    return forced, defaults


def apply_env_defaults(num_qps_per_rank: int, allow_nvlink: bool, allow_mnnvl: bool, single_host: bool,
                       num_rdma_bytes: int, env: Optional[MutableMapping[str, str]] = None) -> Dict[str, Tuple[Optional[str], str]]:
    """Set NVSHMEM's environment for the low-latency buffer; the only place deep_ep writes ``NVSHMEM_*``.

    Args:
        num_qps_per_rank: `Buffer`'s argument (``NVSHMEM_IBGDA_NUM_RC_PER_PE``).
        allow_nvlink: `Buffer`'s ``allow_nvlink_for_low_latency_mode`` (``NVSHMEM_DISABLE_P2P``).
        allow_mnnvl: `Buffer`'s ``allow_mnnvl`` (False -> ``NVSHMEM_DISABLE_MNNVL=1``).
        single_host: every rank is on this host (with ``allow_nvlink``: no NIC needed, so IBGDA off and
            remote transport none by default).
        num_rdma_bytes: the LL buffer size (``NVSHMEM_SYMMETRIC_SIZE`` default).
        env: the mapping to change (default ``os.environ``).

    Returns:
        ``{name: (old value or None, new value)}`` for every variable it changed (also logged).
    """
    env = os.environ if env is None else env
    forced, defaults = env_defaults(num_qps_per_rank, allow_nvlink, allow_mnnvl, single_host, num_rdma_bytes)
    changed: Dict[str, Tuple[Optional[str], str]] = {}
    for name, value in forced.items():
        if env.get(name) != value:
            changed[name] = (env.get(name), value)
            env[name] = value
    for name, value in defaults.items():
        if name not in env:
            changed[name] = (None, value)
            env[name] = value
    if changed:
        log.info("deep_ep: NVSHMEM environment for the low-latency buffer: %s",
                 ", ".join(f"{k}={v!r}" + (f" (was {old!r})" if old is not None else "") for k, (old, v) in changed.items()))
    return changed


_REMOTE_TRANSPORTS = {"ibrc": "IBRC", "ucx": "UCX", "libfabric": "libfabric", "ibdevx": "IBDEVX"}


def _env_true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "y", "on", "t")


def remote_transport(env: Optional[MutableMapping[str, str]] = None) -> Tuple[str, str]:
    """The transport NVSHMEM will use between hosts under this environment (with `env_defaults` for ranks
    on several hosts: IBGDA unless ``NVSHMEM_IB_ENABLE_IBGDA`` says otherwise, else
    ``NVSHMEM_REMOTE_TRANSPORT``, default IBRC), and why the internode kernels cannot run over it.

    Returns:
        ``(name, problem)``: e.g. ``("IBRC without GDRCopy", "")``; ``problem`` is empty when supported,
        else a message that names the variables and the fix. Every transport that carries NVSHMEM's
        puts-with-signal and 64-bit signal operations is supported (IBGDA, IBRC with or without
        GDRCopy, UCX, libfabric: docs/internode-cost.md); ``none`` cannot reach another host.
    """
    env = os.environ if env is None else env
    if _env_true(env.get("NVSHMEM_IB_ENABLE_IBGDA", "1")):
        return "IBGDA", ""
    remote = (env.get("NVSHMEM_REMOTE_TRANSPORT", "") or "ibrc").strip().lower()
    if remote == "none":
        return "none", ("NVSHMEM_REMOTE_TRANSPORT=none with NVSHMEM_IB_ENABLE_IBGDA=0 leaves NVSHMEM no transport "
                        "between hosts; set NVSHMEM_IB_ENABLE_IBGDA=1 (IBGDA) or NVSHMEM_REMOTE_TRANSPORT=ibrc, ucx or "
                        "libfabric")
    if remote not in _REMOTE_TRANSPORTS:
        return remote, (f"NVSHMEM_REMOTE_TRANSPORT={remote!r} is not a transport NVSHMEM 3.4 knows "
                        f"({', '.join(_REMOTE_TRANSPORTS)}, none); set one of those or NVSHMEM_IB_ENABLE_IBGDA=1")
    name = _REMOTE_TRANSPORTS[remote]
    if remote == "ibrc":
        name += " without GDRCopy" if _env_true(env.get("NVSHMEM_DISABLE_GDRCOPY", "0")) else " (GDRCopy if found)"
    return name, ""


def ll_remote_problem(name: str) -> str:
    """Why the low-latency kernels cannot run between hosts over the NVSHMEM transport `name` (from
    `remote_transport`), or "". They set their flags with 4-byte ``nvshmem_int_atomic_set``, which IBRC
    implements only through GDRCopy ("RMA/AMO verb not implemented" otherwise)."""
    if name == "IBRC without GDRCopy":
        return ("the low-latency kernels use 4-byte NVSHMEM atomics, which IBRC without GDRCopy does not "
                "implement (NVSHMEM_DISABLE_GDRCOPY=1); set NVSHMEM_IB_ENABLE_IBGDA=1 (IBGDA), or install "
                "GDRCopy and unset NVSHMEM_DISABLE_GDRCOPY")
    return ""


def qp_depth(env: Optional[MutableMapping[str, str]] = None) -> int:
    env = os.environ if env is None else env
    try:
        return int(env.get("NVSHMEM_QP_DEPTH", str(DEFAULT_QP_DEPTH)))
    except ValueError:
        return DEFAULT_QP_DEPTH


def check_qp_depth(num_max_dispatch_tokens_per_rank: int, env: Optional[MutableMapping[str, str]] = None) -> None:
    """DeepEP's rule (PR #430): ``NVSHMEM_QP_DEPTH >= (num_max_dispatch_tokens_per_rank + 1) * 2``.

    Raises:
        ValueError: the queue pairs are too shallow for this many tokens per rank.
    """
    depth, needed = qp_depth(env), (int(num_max_dispatch_tokens_per_rank) + 1) * 2
    if depth < needed:
        raise ValueError(f"deep_ep.Buffer.low_latency_dispatch: NVSHMEM_QP_DEPTH={depth} is too small for "
                         f"num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}: it must be at least "
                         f"(tokens + 1) * 2 = {needed}; set NVSHMEM_QP_DEPTH before creating the Buffer")


def bootstrap(comm, lib, device: int) -> None:
    """Initialise NVSHMEM over the group: rank 0 makes a unique id, everyone gets it through
    `Communicator.all_gather_object`, then ``NVSHMEMX_INIT_WITH_UNIQUEID`` with the group's ranks.

    Args:
        comm: the Buffer's `Communicator`.
        lib: `deep_ep._core.load_nvshmem()`.
        device: this rank's CUDA device index.
    """
    size = lib.uniqueid_bytes()
    _, pe, _ = lib.info()
    if pe >= 0:  # an earlier Buffer of this process initialised NVSHMEM: join it (no exchange needed)
        lib.init(uniqueid=bytes(size), rank=comm.rank, num_ranks=comm.size, device=device)
        return
    uid = lib.get_uniqueid() if comm.rank == 0 else b""
    ids = comm.all_gather_object(uid, op="NVSHMEM unique id exchange")
    lib.init(uniqueid=ids[0], rank=comm.rank, num_ranks=comm.size, device=device)
