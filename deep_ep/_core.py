"""Loader of the compiled core, ``deep_ep/libdeep_ep_core.so`` (built by ``build_core.py``).

The core has a plain C ABI (``csrc/deep_ep_core.h``) and is loaded with ctypes, so it works with any
Python and torch version. Importing this module never fails: `load()` returns None when the library
is missing or unusable and `load_error()` says why. Nothing here needs a GPU; calls into the
library return CUDA errors (as `CoreError`) when there is none.

ctypes releases the GIL during every call into the library, so the host-side wait of a dispatch
(`deep_ep_runtime_wait_recv_counters`) does not block other Python threads.

The NVSHMEM half of the low-latency mode is a second library, ``deep_ep/libdeep_ep_nvshmem.so``
(``csrc/nvshmem/``, built only when NVSHMEM was found at build time). It needs NVSHMEM's host library
``libnvshmem_host.so.3``, which `load_nvshmem()` loads first, by absolute path, from ``NVSHMEM_DIR/lib``
or the ``nvidia-nvshmem-cu*`` wheel (`find_nvshmem_host_library`), with ``RTLD_GLOBAL``; the dynamic
linker then resolves the library's ``NEEDED libnvshmem_host.so.3`` to it. When any of this is missing
the core still loads and runs (intranode, and low-latency over peer memory).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

__all__ = ["CoreError", "load", "load_error", "library_path", "build_info", "check", "ABI_VERSION",
           "IPC_HANDLE_BYTES", "NUM_LAYOUT_REGIONS", "LLCall", "load_nvshmem", "nvshmem_load_error",
           "nvshmem_library_path", "find_nvshmem_host_library", "check_nvshmem"]

LIBRARY_NAME = "libdeep_ep_core.so"
NVSHMEM_LIBRARY_NAME = "libdeep_ep_nvshmem.so"
NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"
ABI_VERSION = 3              # DEEP_EP_CORE_ABI_VERSION in csrc/deep_ep_core.h
IPC_HANDLE_BYTES = 64        # sizeof(cudaIpcMemHandle_t)
NUM_LAYOUT_REGIONS = 11      # IntranodeLayout::kNumRegions
INTERNODE_MAX_PEERS = 8      # DEEP_EP_INTERNODE_MAX_PEERS
NUM_INTERNODE_RDMA_REGIONS = 8  # InternodeLayout::kNumRdma
NUM_INTERNODE_NVL_REGIONS = 4   # InternodeLayout::kNumNvl

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_tried = False


class CoreError(RuntimeError):
    """A call into the compiled core failed (the message comes from the core)."""


def library_path() -> Path:
    """``DEEP_EP_CORE_LIB`` if set, else the emulated core with ``DEEP_EP_ENGINE=emulated``, else
    ``libdeep_ep_core.so`` next to this file."""
    override = os.environ.get("DEEP_EP_CORE_LIB")
    if override:
        return Path(override)
    from .engines import emulated  # DEEP_EP_ENGINE=emulated: the CPU build of the same C ABI
    if emulated.active():
        return emulated.library_path()
    return Path(__file__).resolve().parent / LIBRARY_NAME


_vp, _i32, _i64, _u64, _f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_double
_pi32 = ctypes.POINTER(ctypes.c_int)

# name -> (restype, argtypes). Mirrors csrc/deep_ep_core.h; every pointer travels as c_void_p.
_SIGNATURES: Dict[str, Any] = {
    "deep_ep_core_abi_version": (_i32, []),
    "deep_ep_core_is_sm90": (_i32, []),
    "deep_ep_core_has_nvshmem": (_i32, []),
    "deep_ep_core_last_error": (ctypes.c_char_p, []),
    "deep_ep_core_limits": (_i32, [_pi32, _i32]),
    "deep_ep_core_device_count": (_i32, [_pi32]),
    "deep_ep_core_device_pci_bus_id": (_i32, [_i32, ctypes.c_char_p, _i32]),
    "deep_ep_core_device_by_pci_bus_id": (_i32, [ctypes.c_char_p, _pi32]),
    "deep_ep_core_can_access_peer": (_i32, [_i32, _i32, _pi32]),
    "deep_ep_runtime_create": (_i32, [_i32, _i32, _i32, _i64, _f64, ctypes.POINTER(_vp)]),
    "deep_ep_runtime_destroy": (_i32, [_vp]),
    "deep_ep_runtime_ipc_handle": (_i32, [_vp, _vp, _i32]),
    "deep_ep_runtime_local_ptr": (_i32, [_vp, ctypes.POINTER(_u64)]),
    "deep_ep_runtime_open_peers": (_i32, [_vp, _vp, ctypes.POINTER(_u64), _pi32]),
    "deep_ep_runtime_synchronize": (_i32, [_vp]),
    "deep_ep_runtime_wait_recv_counters": (_i32, [_vp, _u64, _i32, _pi32]),
    "deep_ep_runtime_take_worst_overflow": (_i32, [_vp, _pi32]),
    "deep_ep_get_dispatch_layout": (_i32, [_i32, _u64, _vp, _vp, _vp, _vp, _i32, _i32, _i32, _i32]),
    "deep_ep_intranode_buffer_bytes": (_i64, [_i32, _i32, _i32, _i32, _i64, _i32, _i32, _i32]),
    "deep_ep_intranode_notify_dispatch": (
        _i32, [_vp, _u64, _vp, _vp, _vp, _vp, _vp, _i32, _i32, _i32, _i32, _i64, _i32, _i32, _i32, _i32]),
    "deep_ep_intranode_dispatch": (
        _i32, [_vp, _u64, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i64, _vp, _vp, _vp, _vp, _vp,
               _i32, _i32, _i32, _i32, _i32, _i32, _i32, _i64, _i32, _i32, _i32]),
    "deep_ep_intranode_combine": (
        _i32, [_vp, _u64, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i32, _i32, _i32, _i32, _i64, _i32]),
    "deep_ep_host_channel_range": (None, [_i32, _i32, _i32, _pi32, _pi32]),
    "deep_ep_host_recv_segment": (None, [_pi32, _pi32, _i32, _i32, _i32, _i32, _i32, _pi32, _pi32]),
    "deep_ep_host_aligned_count": (_i32, [_i32, _i32]),
    "deep_ep_host_ring_free_slots": (_i32, [_i32, _i32, _i32]),
    "deep_ep_host_intranode_layout": (
        _i64, [_i32, _i32, _i32, _i32, _i64, _i32, _i32, _i32, ctypes.POINTER(_i64), _i32]),
    # internode (csrc/deep_ep_internode.h)
    "deep_ep_internode_call_bytes": (_i32, []),
    "deep_ep_internode_layout_bytes": (_i32, [_vp, ctypes.POINTER(_i64), ctypes.POINTER(_i64)]),
    "deep_ep_internode_launch": (_i32, [_vp, _vp, _i64, _u64]),
    "deep_ep_runtime_host_counter": (_i32, [_vp, _i32, _pi32]),
    "deep_ep_runtime_peer_ptr": (_i32, [_vp, _i32, ctypes.POINTER(_u64)]),
    "deep_ep_runtime_device_counters": (_i32, [_vp, ctypes.POINTER(_u64)]),
    "deep_ep_runtime_reset_recv_counters": (_i32, [_vp, _i32]),
    "deep_ep_host_internode_layout": (
        _i32, [_i32, _i32, _i32, _i32, _i32, _i32, _i64, _i32, _i32, _i32, ctypes.POINTER(_i64), _i32,
               ctypes.POINTER(_i64), _i32]),
    # low-latency (csrc/deep_ep_ll.h)
    "deep_ep_ll_call_bytes": (_i32, []),
    "deep_ep_ll_workspace_words": (_i64, [_i32, _i32, _i32]),
    "deep_ep_ll_layout": (_i32, [_i32, _i32, _i32, ctypes.POINTER(_i64), _i32]),
    "deep_ep_ll_host_fp8_cast": (None, [_vp, _i32, _i32, _vp, _vp]),
    "deep_ep_ll_host_logfmt10_round": (None, [_vp, _i32, _vp]),
    "deep_ep_ll_host_pack_signal": (_i32, [_i32, _i32]),
    "deep_ep_ll_host_next_epoch": (_i32, [_i32]),
    "deep_ep_ll_prepare": (_i32, [_vp, _u64]),
    "deep_ep_ll_peer_send": (_i32, [_vp, _vp, _u64]),
    "deep_ep_ll_receive": (_i32, [_vp, _u64]),
}

_NVSHMEM_SIGNATURES: Dict[str, Any] = {
    "deep_ep_nvshmem_abi_version": (_i32, []),
    "deep_ep_nvshmem_last_error": (ctypes.c_char_p, []),
    "deep_ep_nvshmem_call_bytes": (_i32, []),
    "deep_ep_nvshmem_uniqueid_bytes": (_i32, []),
    "deep_ep_nvshmem_get_uniqueid": (_i32, [_vp]),
    "deep_ep_nvshmem_init": (_i32, [_vp, _i32, _i32, _i32]),
    "deep_ep_nvshmem_alloc": (_i32, [_i64, ctypes.POINTER(_u64)]),
    "deep_ep_nvshmem_free": (_i32, [_u64]),
    "deep_ep_nvshmem_barrier": (_i32, []),
    "deep_ep_nvshmem_finalize": (_i32, []),
    "deep_ep_nvshmem_info": (_i32, [_pi32, _pi32, _pi32]),
    "deep_ep_nvshmem_ll_send": (_i32, [_vp, _u64]),
    "deep_ep_nvshmem_internode_launch": (_i32, [_vp, _u64]),
    "deep_ep_nvshmem_internode_call_bytes": (_i32, []),
}


class LLCall(ctypes.Structure):
    """Mirror of ``deep_ep_ll_call`` (csrc/deep_ep_ll.h); its size is checked against the library's."""
    _fields_ = [(name, ctypes.c_int32) for name in (
        "kind", "rank", "num_ranks", "slot", "num_tokens", "num_max_tokens", "hidden", "num_experts", "num_topk",
        "use_fp8", "round_scale", "use_ue8m0", "use_logfmt", "zero_copy", "shrink", "num_sms")] + [
        ("timeout_ns", ctypes.c_uint64), ("buffer", ctypes.c_void_p),
        ("signaling_offset", ctypes.c_int64 * 2), ("send_offset", ctypes.c_int64 * 2),
        ("recv_offset", ctypes.c_int64 * 2), ("dispatch_msg_bytes", ctypes.c_int64),
        ("combine_msg_bytes", ctypes.c_int64)] + [(name, ctypes.c_void_p) for name in (
            "workspace", "mask", "host_flags", "x", "topk_idx", "topk_weights", "recv_x", "recv_scales",
            "recv_count", "src_info", "layout_range", "cumulative_stats", "wait_stats", "combined_x")]


class InternodeCall(ctypes.Structure):
    """Mirror of ``deep_ep_internode_call`` (csrc/deep_ep_internode.h); its size is checked against the
    library's (`check_internode_call_size`)."""
    _fields_ = [(name, ctypes.c_int32) for name in (
        "op", "rank", "num_ranks", "num_ranks_per_node", "num_channels", "num_rdma_slots", "num_nvl_slots",
        "num_max_rdma_send", "num_max_nvl_send", "num_tokens", "num_experts", "num_topk", "num_scales")] + [
        ("row_bytes", ctypes.c_int64)] + [(name, ctypes.c_int32) for name in (
            "expert_alignment", "num_worst_tokens", "num_recv_rows", "fill_trailing_rows", "cached", "device",
            "nvshmem_p2p_group")] + [
        ("timeout_ns", ctypes.c_uint64), ("host_counters", ctypes.c_void_p), ("rdma_local", ctypes.c_void_p),
        ("rdma_peers", ctypes.c_void_p * INTERNODE_MAX_PEERS), ("nvl_peers", ctypes.c_void_p * INTERNODE_MAX_PEERS),
        ("x", ctypes.c_void_p), ("x_scales", ctypes.c_void_p), ("scale_token_stride", ctypes.c_int64),
        ("scale_hidden_stride", ctypes.c_int64)] + [(name, ctypes.c_void_p) for name in (
            "topk_idx", "topk_weights", "is_token_in_rank", "num_tokens_per_expert", "bias_0", "bias_1",
            "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix", "recv_rdma_channel_prefix_matrix",
            "recv_rdma_rank_prefix_sum", "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum",
            "recv_src_meta", "send_rdma_head", "send_nvl_head")] + [("send_nvl_head_rows", ctypes.c_int32)] + [
        (name, ctypes.c_void_p) for name in ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
                                             "recv_src_idx")]


INTERNODE_NOTIFY, INTERNODE_DISPATCH, INTERNODE_COMBINE = 0, 1, 2


def check_internode_call_size(lib: ctypes.CDLL, nvshmem: bool = False) -> None:
    """The ctypes mirror must have the C struct's size (a field added on one side only would shift every
    later field). ``nvshmem``: check libdeep_ep_nvshmem.so's copy instead of the core's."""
    size = lib.deep_ep_nvshmem_internode_call_bytes() if nvshmem else lib.deep_ep_internode_call_bytes()
    if size != ctypes.sizeof(InternodeCall):
        name = "libdeep_ep_nvshmem.so" if nvshmem else "the core"
        raise CoreError(f"deep_ep_internode_call is {size} bytes in {name} but {ctypes.sizeof(InternodeCall)} in "
                        "deep_ep._core.InternodeCall: rebuild the libraries (python build_core.py)")


LL_DISPATCH, LL_COMBINE = 1, 2
LL_SEND, LL_RECV = 1, 2


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)  # AttributeError: a stale library; reported by load()
        fn.restype = restype
        fn.argtypes = argtypes
    version = lib.deep_ep_core_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"ABI version {version}, this deep_ep expects {ABI_VERSION}: rebuild with `python build_core.py`")
    if lib.deep_ep_ll_call_bytes() != ctypes.sizeof(LLCall):
        raise OSError(f"deep_ep_ll_call is {lib.deep_ep_ll_call_bytes()} bytes in the library, {ctypes.sizeof(LLCall)} "
                      f"in deep_ep._core.LLCall: rebuild with `python build_core.py`")
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The core library, or None (see `load_error`). Loaded once per process."""
    global _lib, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            path = library_path()
            if not path.is_file():
                _error = (f"the compiled core {path.name} is not built (no {path}); build it with "
                          f"`python build_core.py` (needs nvcc) or install deep_ep with CUDA_HOME set")
            else:
                try:
                    _lib = _open(path)
                except (OSError, AttributeError) as exc:
                    _error = f"the compiled core {path} cannot be loaded: {exc}"
        return _lib


def load_error() -> Optional[str]:
    """Why `load()` returned None (None when it loaded)."""
    load()
    return _error


def last_error() -> str:
    lib = load()
    if lib is None:
        return _error or "core not loaded"
    raw = lib.deep_ep_core_last_error()
    return raw.decode(errors="replace") if raw else "unknown error"


def check(rc: int, what: str) -> None:
    """Raise `CoreError` when a core call returned non-zero."""
    if rc != 0:
        raise CoreError(f"deep_ep core: {what}: {last_error()}")


def build_info() -> Dict[str, Any]:
    """What ``build_core.py`` recorded next to the library (empty when absent)."""
    path = library_path().with_name("_core_build.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def limits() -> Dict[str, int]:
    """Compile-time limits of the loaded core."""
    lib = load()
    if lib is None:
        raise CoreError(load_error() or "core not loaded")
    keys = ("max_ranks", "max_channels", "max_topk", "max_local_experts", "threads_per_block", "num_host_counters",
            "max_internode_nodes")
    values = (ctypes.c_int * len(keys))()
    lib.deep_ep_core_limits(values, len(keys))
    return dict(zip(keys, list(values)))


# ------------------------------------------------------------------------------------------------
# The NVSHMEM library (low-latency mode over NVSHMEM)

_nv_lib: Optional[ctypes.CDLL] = None
_nv_error: Optional[str] = None
_nv_tried = False


def nvshmem_library_path() -> Path:
    """``DEEP_EP_NVSHMEM_LIB`` if set, else ``libdeep_ep_nvshmem.so`` next to this file."""
    override = os.environ.get("DEEP_EP_NVSHMEM_LIB")
    if override:
        return Path(override)
    from .engines import emulated  # DEEP_EP_ENGINE=emulated: built over the NVSHMEM stand-in
    if emulated.active():
        return emulated.library_path().with_name(NVSHMEM_LIBRARY_NAME)
    return Path(__file__).resolve().parent / NVSHMEM_LIBRARY_NAME


def find_nvshmem_host_library(env: Optional[Dict[str, str]] = None) -> Tuple[Optional[Path], str]:
    """NVSHMEM's host library: ``(path or None, where it was looked for)``.

    ``NVSHMEM_DIR/lib/libnvshmem_host.so.3`` when ``NVSHMEM_DIR`` is set (and only there), else the
    ``nvidia-nvshmem-cu*`` wheel's ``nvidia/nvshmem/lib/libnvshmem_host.so.3``.
    """
    env = os.environ if env is None else env
    nvshmem_dir = env.get("NVSHMEM_DIR")
    if nvshmem_dir:
        path = Path(nvshmem_dir) / "lib" / NVSHMEM_HOST_LIBRARY
        return (path, f"NVSHMEM_DIR={nvshmem_dir}") if path.is_file() else (None, f"no {path} (NVSHMEM_DIR)")
    try:
        import importlib.util
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, "no NVSHMEM_DIR and no nvidia-nvshmem-cu* wheel installed"
    for location in spec.submodule_search_locations:
        path = Path(location) / "lib" / NVSHMEM_HOST_LIBRARY
        if path.is_file():
            return path, f"wheel at {location}"
    return None, f"the nvidia-nvshmem wheel at {list(spec.submodule_search_locations)} has no lib/{NVSHMEM_HOST_LIBRARY}"


def load_nvshmem() -> Optional[ctypes.CDLL]:
    """``libdeep_ep_nvshmem.so`` (after NVSHMEM's host library), or None (see `nvshmem_load_error`)."""
    global _nv_lib, _nv_error, _nv_tried
    with _lock:
        if _nv_tried:
            return _nv_lib
        _nv_tried = True
        path = nvshmem_library_path()
        if not path.is_file():
            _nv_error = (f"{path.name} is not built (NVSHMEM was not found when `python build_core.py` ran; install "
                         f"nvidia-nvshmem-cu13 or set NVSHMEM_DIR and rebuild)")
            return None
        from .engines import emulated
        host, where = (None, "") if emulated.active() else find_nvshmem_host_library()  # stand-in: no host lib
        if host is None and not emulated.active():
            _nv_error = f"NVSHMEM's host library {NVSHMEM_HOST_LIBRARY} is not available: {where}"
            return None
        try:
            if host is not None:
                ctypes.CDLL(str(host), mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(str(path))
            for name, (restype, argtypes) in _NVSHMEM_SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
            if lib.deep_ep_nvshmem_call_bytes() != ctypes.sizeof(LLCall):
                raise OSError("deep_ep_ll_call size mismatch: rebuild with `python build_core.py`")
            _nv_lib = lib
        except (OSError, AttributeError) as exc:
            _nv_error = f"{path} cannot be loaded (NVSHMEM host library {host}, {where}): {exc}"
        return _nv_lib


def nvshmem_load_error() -> Optional[str]:
    load_nvshmem()
    return _nv_error


def check_nvshmem(rc: int, what: str) -> None:
    """Raise `CoreError` when a call into the NVSHMEM library returned non-zero."""
    if rc != 0:
        lib = load_nvshmem()
        raw = lib.deep_ep_nvshmem_last_error() if lib is not None else None
        raise CoreError(f"deep_ep nvshmem: {what}: {raw.decode(errors='replace') if raw else _nv_error}")
