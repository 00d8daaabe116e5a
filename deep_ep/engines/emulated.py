"""The emulated engine: the CUDA engines' own host code (`deep_ep.engines.cuda`, ``_core``) and the real
kernels of ``csrc/``, compiled with the host compiler against the kernel emulator in ``csrc/emu/``
(``build_emu.py``), on CPU tensors. Selected with ``DEEP_EP_ENGINE=emulated``; it exists to execute and
check the kernels on machines without a GPU (tests/test_emulated.py) and is far slower than either
real engine.

What differs from the CUDA engine lives here, so the engines stay one code path:

* the libraries: ``build/emu/<flavour>/libdeep_ep_core.so`` (`library_path`) and
  ``libdeep_ep_nvshmem.so`` next to it (over the NVSHMEM stand-in of ``csrc/emu/nvshmem``), flavour from
  ``DEEP_EP_EMU_FLAVOUR`` = ``plain`` (default), ``asan`` or ``tsan``; the sanitizer flavours need their
  runtime preloaded into the process (`sanitizer_env`);
* tensors live on the CPU (`device`), the stream handle is 0 and every launch has finished when the
  call returns (host-synchronous), so there are no events to record and nothing is ever captured.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

__all__ = ["ENGINE", "active", "flavour", "library_path", "device", "stream", "num_sms", "host_bytes",
           "sanitizer_env"]

ENGINE = "emulated"
FLAVOURS = ("plain", "asan", "tsan")
_ROOT = Path(__file__).resolve().parents[2]


def active() -> bool:
    """Whether this process runs the emulated engine (``DEEP_EP_ENGINE=emulated``)."""
    return os.environ.get("DEEP_EP_ENGINE", "").strip().lower() == ENGINE


def flavour() -> str:
    """``DEEP_EP_EMU_FLAVOUR``: plain (default), asan or tsan."""
    value = os.environ.get("DEEP_EP_EMU_FLAVOUR", "").strip().lower() or "plain"
    if value not in FLAVOURS:
        raise ValueError(f"deep_ep: DEEP_EP_EMU_FLAVOUR must be one of {', '.join(FLAVOURS)}, got {value!r}")
    return value


def library_path(which: Optional[str] = None) -> Path:
    """The emulated core of flavour `which` (default `flavour()`), as ``build_emu.py`` writes it."""
    return _ROOT / "build" / "emu" / (which or flavour()) / "libdeep_ep_core.so"


def device(emulated: bool) -> torch.device:
    """The device of an engine's tensors: the CPU when emulated, else the current CUDA device."""
    return torch.device("cpu") if emulated else torch.device("cuda", torch.cuda.current_device())


def stream(emulated: bool, dev: Optional[torch.device] = None) -> int:
    """The stream handle the core gets: 0 when emulated (launches are host-synchronous)."""
    if emulated:
        return 0
    return torch.cuda.current_stream(dev).cuda_stream


def num_sms(emulated: bool, dev: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of the device (the emulated runtime reports 132)."""
    if emulated:
        return 132
    return torch.cuda.get_device_properties(dev).multi_processor_count


def host_bytes(ptr: int, nbytes: int, owner: object) -> torch.Tensor:
    """A 1-D uint8 CPU tensor over `nbytes` of emulated device memory at `ptr`; the tensor keeps
    `owner` (the engine owning the allocation) alive."""
    from .. import _core_binding  # the emulated engine runs only with the binding built
    return torch.frombuffer(_core_binding.host_memory(ptr, nbytes, owner), dtype=torch.uint8)


def sanitizer_env(which: str) -> Dict[str, str]:
    """Environment for a process that loads the `which` flavour: its sanitizer runtime preloaded."""
    if which == "plain":
        return {}
    runtime = "libasan.so" if which == "asan" else "libtsan.so"
    cxx = os.environ.get("CXX", "g++")
    path = subprocess.run([cxx, f"-print-file-name={runtime}"], capture_output=True, text=True).stdout.strip()
    env = {"LD_PRELOAD": os.path.realpath(path), "DEEP_EP_EMU_FLAVOUR": which}
    if which == "asan":
        # Python itself leaks by design, and is not instrumented: only the library's reports count.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:verify_asan_link_order=0"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    else:
        env["TSAN_OPTIONS"] = "halt_on_error=1:report_signal_unsafe=0:ignore_noninstrumented_modules=1"
    return env
