"""Loader of the compiled libraries through their pybind11 modules (``csrc/python/``).

Two compiled libraries, one pybind11 module each (built by ``build_core.py``, ``make core`` or
``pip install`` with the nvcc step):

* ``libdeep_ep_core.so`` (C ABI ``csrc/deep_ep_core.h``, ``deep_ep_ll.h``, ``deep_ep_internode.h``),
  bound by ``deep_ep._core_binding``;
* ``libdeep_ep_nvshmem.so`` (the NVSHMEM half, built only when NVSHMEM was found at build time), bound
  by ``deep_ep._nvshmem_binding``.

The modules include no torch header: tensors cross as integer device pointers (``t.data_ptr()``, None
for NULL) and sizes, streams as ``cuda_stream`` ints. Every function takes keyword arguments, raises
`CoreError` with the library's own message when the C call fails, and releases the GIL while the
library runs (the host-side wait of a dispatch does not block other Python threads).

The modules open their library with dlopen at a path chosen here, so one module serves any build of
the same ABI: `load()` opens ``DEEP_EP_CORE_LIB`` when set (a path to another build of ``csrc/``, e.g.
a CPU build), else ``libdeep_ep_core.so`` next to this file; `open_core(path)` opens any other one
alongside it. Importing this module never fails: `load()` returns None when the library or its
module is missing or unusable and `load_error()` says why. Nothing here needs a GPU; calls that need
one raise `CoreError` with the CUDA error.

``libdeep_ep_nvshmem.so`` needs NVSHMEM's host library ``libnvshmem_host.so.3``: `load_nvshmem()`
passes its absolute path, from ``NVSHMEM_DIR/lib`` or the ``nvidia-nvshmem-cu*`` wheel
(`find_nvshmem_host_library`), to the module, which loads it with ``RTLD_GLOBAL`` first; the dynamic
linker then resolves the library's ``NEEDED libnvshmem_host.so.3`` to it. When any of this is missing
the core still loads and runs (intranode, and low-latency over peer memory).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

__all__ = ["CoreError", "load", "load_error", "open_core", "library_path", "build_info", "limits", "last_error",
           "ABI_VERSION", "IPC_HANDLE_BYTES", "NUM_LAYOUT_REGIONS", "LLCall", "InternodeCall", "load_nvshmem",
           "nvshmem_load_error", "nvshmem_library_path", "find_nvshmem_host_library", "binding_error"]

LIBRARY_NAME = "libdeep_ep_core.so"
NVSHMEM_LIBRARY_NAME = "libdeep_ep_nvshmem.so"
NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"
ABI_VERSION = 3              # DEEP_EP_CORE_ABI_VERSION in csrc/deep_ep_core.h (the binding checks the library's)
IPC_HANDLE_BYTES = 64        # sizeof(cudaIpcMemHandle_t)
NUM_LAYOUT_REGIONS = 11      # IntranodeLayout::kNumRegions
INTERNODE_MAX_PEERS = 8      # DEEP_EP_INTERNODE_MAX_PEERS
NUM_INTERNODE_RDMA_REGIONS = 8  # InternodeLayout::kNumRdma
NUM_INTERNODE_NVL_REGIONS = 4   # InternodeLayout::kNumNvl
INTERNODE_NOTIFY, INTERNODE_DISPATCH, INTERNODE_COMBINE = 0, 1, 2   # enum deep_ep_internode_op
LL_DISPATCH, LL_COMBINE = 1, 2                                      # DEEP_EP_LL_DISPATCH / _COMBINE
LL_SEND, LL_RECV = 1, 2                                             # DEEP_EP_LL_SEND / _RECV

try:
    from . import _core_binding as _binding
    _binding_error: Optional[str] = None
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _binding = None
    _binding_error = (f"the pybind11 module deep_ep._core_binding cannot be imported ({exc}); build it with "
                      f"`python build_core.py --bindings-only` (needs g++ and pybind11)")

if _binding is not None:
    CoreError = _binding.CoreError
    LLCall = _binding.LLCall
    InternodeCall = _binding.InternodeCall
else:
    class CoreError(RuntimeError):  # type: ignore[no-redef]
        """A call into a compiled deep_ep library failed (the message names the C function)."""

    LLCall = InternodeCall = None  # type: ignore[assignment,misc]

_lock = threading.Lock()
_opened: Dict[str, Any] = {}
_lib: Any = None
_error: Optional[str] = None
_tried = False


def binding_error() -> Optional[str]:
    """Why ``deep_ep._core_binding`` cannot be imported (None when it can)."""
    return _binding_error


def library_path() -> Path:
    """``DEEP_EP_CORE_LIB`` if set (another build of the core's ABI), else the emulated core with
    ``DEEP_EP_ENGINE=emulated`` (the CPU build of the same sources), else ``libdeep_ep_core.so`` next to
    this file."""
    override = os.environ.get("DEEP_EP_CORE_LIB")
    if override:
        return Path(override)
    from .engines import emulated  # DEEP_EP_ENGINE=emulated: the CPU build of the same C ABI
    if emulated.active():
        return emulated.library_path()
    return Path(__file__).resolve().parent / LIBRARY_NAME


def open_core(path: os.PathLike) -> Any:
    """Open a library that exports the core's C ABI at ``path`` (once per path and process) and return
    its binding (`deep_ep._core_binding.Core`). Raises `CoreError` when the module is missing and
    ``OSError`` (``deep_ep._core_binding.LibraryError``) when the library cannot be opened or does not
    match the binding (ABI version, struct sizes, a missing function)."""
    if _binding is None:
        raise CoreError(_binding_error)
    key = str(Path(path).resolve())
    with _lock:
        if key not in _opened:
            _opened[key] = _binding.open(key)
        return _opened[key]


def load() -> Any:
    """The core's binding (`library_path()` opened by `open_core`), or None (see `load_error`). Loaded
    once per process."""
    global _lib, _error, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        path = library_path()
    lib, error = None, None
    if not path.is_file():
        error = (f"the compiled core {path.name} is not built (no {path}); build it with "
                 f"`python build_core.py` (needs nvcc) or install deep_ep with CUDA_HOME set")
    elif _binding is None:
        error = _binding_error
    else:
        try:
            lib = open_core(path)
        except OSError as exc:
            error = f"the compiled core {path} cannot be loaded: {exc}"
    with _lock:
        _lib, _error = lib, error
        return _lib


def load_error() -> Optional[str]:
    """Why `load()` returned None (None when it loaded)."""
    load()
    return _error


def last_error() -> str:
    """The calling thread's last message of the core (or why it is not loaded)."""
    lib = load()
    return (_error or "core not loaded") if lib is None else (lib.last_error() or "unknown error")


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
    return dict(zip(keys, lib.limits()))


# ------------------------------------------------------------------------------------------------
# The NVSHMEM library (low-latency and internode modes over NVSHMEM)

_nv_lib: Any = None
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


def load_nvshmem() -> Any:
    """The binding of ``libdeep_ep_nvshmem.so`` (`deep_ep._nvshmem_binding.Nvshmem`, opened after NVSHMEM's
    host library), or None (see `nvshmem_load_error`)."""
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
        if _binding is None:
            _nv_error = _binding_error
            return None
        try:
            from . import _nvshmem_binding
            _nv_lib = _nvshmem_binding.open(str(path), "" if host is None else str(host))
        except ImportError as exc:
            _nv_error = (f"the pybind11 module deep_ep._nvshmem_binding cannot be imported ({exc}); build it with "
                         f"`python build_core.py --bindings-only`")
        except OSError as exc:
            _nv_error = f"{path} cannot be loaded (NVSHMEM host library {host}, {where}): {exc}"
        return _nv_lib


def nvshmem_load_error() -> Optional[str]:
    """Why `load_nvshmem()` returned None (None when it loaded)."""
    load_nvshmem()
    return _nv_error
