"""Loader of the compiled core, ``deep_ep/libdeep_ep_core.so`` (built by ``build_core.py``).

The core has a plain C ABI (``csrc/deep_ep_core.h``) and is loaded with ctypes, so it works with any
Python and torch version. Importing this module never fails: `load()` returns None when the library
is missing or unusable and `load_error()` says why. Nothing here needs a GPU; calls into the
library return CUDA errors (as `CoreError`) when there is none.

ctypes releases the GIL during every call into the library, so the host-side wait of a dispatch
(`deep_ep_runtime_wait_recv_counters`) does not block other Python threads.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["CoreError", "load", "load_error", "library_path", "build_info", "check", "ABI_VERSION",
           "IPC_HANDLE_BYTES", "NUM_LAYOUT_REGIONS"]

LIBRARY_NAME = "libdeep_ep_core.so"
ABI_VERSION = 1              # DEEP_EP_CORE_ABI_VERSION in csrc/deep_ep_core.h
IPC_HANDLE_BYTES = 64        # sizeof(cudaIpcMemHandle_t)
NUM_LAYOUT_REGIONS = 11      # IntranodeLayout::kNumRegions

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_tried = False


class CoreError(RuntimeError):
    """A call into the compiled core failed (the message comes from the core)."""


def library_path() -> Path:
    """``DEEP_EP_CORE_LIB`` if set, else ``libdeep_ep_core.so`` next to this file."""
    override = os.environ.get("DEEP_EP_CORE_LIB")
    return Path(override) if override else Path(__file__).resolve().parent / LIBRARY_NAME


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
}


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)  # AttributeError: a stale library; reported by load()
        fn.restype = restype
        fn.argtypes = argtypes
    version = lib.deep_ep_core_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"ABI version {version}, this deep_ep expects {ABI_VERSION}: rebuild with `python build_core.py`")
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
    values = (ctypes.c_int * 6)()
    lib.deep_ep_core_limits(values, 6)
    keys = ("max_ranks", "max_channels", "max_topk", "max_local_experts", "threads_per_block", "num_host_counters")
    return dict(zip(keys, list(values)))
