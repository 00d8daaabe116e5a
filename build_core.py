#!/usr/bin/env python3
"""Build deep_ep's compiled core, ``deep_ep/libdeep_ep_core.so``, with nvcc alone.

The core is a plain C-ABI shared library (``csrc/deep_ep_core.h``): no torch or CPython headers, the
CUDA runtime linked statically, no ``-lcuda`` (the runtime finds the driver at run time), so one build
serves every Python and torch version and builds on a machine without a GPU. Python reaches it through
a pybind11 module (``csrc/python/``, `build_bindings`: g++ against the C headers, no torch headers),
which ``deep_ep/_core.py`` uses to open the library.

Usage::

    python build_core.py                 # sm_90, into deep_ep/
    DISABLE_SM90_FEATURES=1 python build_core.py   # sm_80 build without Hopper-only features
    python build_core.py --arch 80,90 --jobs 8 --output-dir /tmp/core

From Python (setup.py does this)::

    from build_core import build_core, should_build_core
    build, reason = should_build_core()
    if build:
        build_core()

Every build prints ptxas' resource report (registers, stack, spills) per kernel and, by default,
fails if a kernel spills registers (``--allow-spills`` turns that into a warning).

Environment: ``CUDA_HOME`` / ``CUDA_PATH`` (where nvcc lives; default ``/usr/local/cuda``, then
``PATH``), ``DEEP_EP_BUILD_CUDA`` (``0`` never / ``1`` always / unset: when nvcc is found; read by
`should_build_core`), ``DISABLE_SM90_FEATURES=1``, ``DEEP_EP_CUDA_ARCH`` (e.g. ``90`` or ``80,90``),
``NVSHMEM_DIR`` (else the ``nvidia-nvshmem-cu13``/``-cu12`` wheel), ``DEEP_EP_DISABLE_NVSHMEM=1`` (skip
the NVSHMEM library), ``DEEP_EP_BUILD_JOBS``.

Two libraries come out:

* ``libdeep_ep_core.so``: layout, intranode, internode and low-latency kernels over peer memory (CUDA
  IPC); no NVSHMEM dependency, always built.
* ``libdeep_ep_nvshmem.so``: the NVSHMEM bootstrap, the low-latency send kernels and the internode
  kernels over NVSHMEM's public device API; built when NVSHMEM is found (else the build fails, unless
  ``DEEP_EP_DISABLE_NVSHMEM=1``). ``csrc/nvshmem/*.cu`` are compiled with
  ``-rdc=true``, device-linked (``nvcc -dlink ... -lnvshmem_device``) and linked against
  ``libnvshmem_host.so.3`` by SONAME with no rpath: ``deep_ep/_core.py`` loads that library from the
  wheel (or ``NVSHMEM_DIR``) before this one, so the core keeps working where NVSHMEM is absent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["build_core", "build_bindings", "build_requirements", "nvshmem_for_build", "should_build_core", "find_nvcc", "find_nvshmem", "parse_ptxas_report",
           "c_struct_fields", "BuildError", "LIBRARY_NAME", "BINDING_MODULES"]

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
LIBRARY_NAME = "libdeep_ep_core.so"
NVSHMEM_LIBRARY_NAME = "libdeep_ep_nvshmem.so"
NVSHMEM_SOURCES = CSRC / "nvshmem"
BUILD_INFO_NAME = "_core_build.json"
BINDING_SOURCES = CSRC / "python"
# pybind11 module name -> its source; one module per compiled library (the core ABI, the NVSHMEM library).
BINDING_MODULES = {"_core_binding": "core_binding.cpp", "_nvshmem_binding": "nvshmem_binding.cpp"}
# C structs whose field lists the binding reads from the headers (generated header, see c_struct_fields).
BOUND_STRUCTS = {"deep_ep_ll_call": "deep_ep_ll.h", "deep_ep_internode_call": "deep_ep_internode.h"}


class BuildError(RuntimeError):
    """The core could not be built (missing nvcc, compile error, or a kernel that spills)."""


# ----------------------------------------------------------------------------------------- discovery

def find_nvcc() -> Optional[Path]:
    """nvcc from ``CUDA_HOME``/``CUDA_PATH``, else ``/usr/local/cuda``, else ``PATH``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    default = Path("/usr/local/cuda/bin/nvcc")
    if default.is_file():
        return default
    found = shutil.which("nvcc")
    return Path(found) if found else None


def nvcc_version(nvcc: Path) -> Tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise BuildError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def find_nvshmem(cuda_major: Optional[int] = None) -> Tuple[Optional[Path], str]:
    """NVSHMEM from ``NVSHMEM_DIR`` or the ``nvidia-nvshmem-cu<major>`` wheel: ``(dir or None, note)``."""
    env = os.environ.get("NVSHMEM_DIR")
    if env:
        path = Path(env)
        if (path / "include" / "nvshmem.h").is_file():
            return path, f"NVSHMEM_DIR={path}"
        return None, f"NVSHMEM_DIR={path} has no include/nvshmem.h"
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, "no NVSHMEM_DIR and no nvidia-nvshmem-cu* wheel installed"
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / "include" / "nvshmem.h").is_file():
        return None, f"{path} has no include/nvshmem.h"
    note = f"wheel at {path}"
    if cuda_major is not None:
        try:
            from importlib import metadata
            names = [d.metadata["Name"] for d in metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("nvidia-nvshmem")]
            if names and not any(n.lower().endswith(f"cu{cuda_major}") for n in names):
                note += f" (installed: {', '.join(names)}; nvcc is CUDA {cuda_major})"
        except Exception:  # metadata is best effort
            pass
    return path, note


def nvshmem_disabled(env: Optional[Dict[str, str]] = None) -> bool:
    """``DEEP_EP_DISABLE_NVSHMEM`` set to anything but 0: build the core without libdeep_ep_nvshmem.so."""
    env = os.environ if env is None else env
    return env.get("DEEP_EP_DISABLE_NVSHMEM", "0").strip() not in ("", "0")


def nvshmem_for_build(cuda_major: int) -> Tuple[Optional[Path], str]:
    """NVSHMEM for the NVSHMEM library: ``(dir, note)``, or ``(None, note)`` when ``DEEP_EP_DISABLE_NVSHMEM``
    is set.

    Raises:
        BuildError: NVSHMEM is not found (or is incomplete) and not disabled. A build with nvcc never
            silently drops ``libdeep_ep_nvshmem.so`` (what an isolated ``pip wheel .`` did when its
            build environment could not see the installed wheel); the message says how to get it.
    """
    if nvshmem_disabled():
        return None, "DEEP_EP_DISABLE_NVSHMEM set: libdeep_ep_nvshmem.so not built"
    nvshmem_dir, note = find_nvshmem(cuda_major)
    if nvshmem_dir is not None and not (nvshmem_dir / "lib" / "libnvshmem_device.a").is_file():
        nvshmem_dir, note = None, f"{note}: no lib/libnvshmem_device.a"
    if nvshmem_dir is not None and not list((nvshmem_dir / "lib").glob("libnvshmem_host.so*")):
        nvshmem_dir, note = None, f"{note}: no lib/libnvshmem_host.so*"
    if nvshmem_dir is None:
        raise BuildError(
            f"NVSHMEM not found ({note}), so libdeep_ep_nvshmem.so (low-latency and multi-node modes over NVSHMEM) "
            f"cannot be built. Install it into the environment that builds deep_ep: `pip install "
            f"nvidia-nvshmem-cu{cuda_major}` (an isolated `pip install .`/`pip wheel .` gets it from pyproject.toml's "
            f"build requirements), or set NVSHMEM_DIR to an NVSHMEM install; or set DEEP_EP_DISABLE_NVSHMEM=1 to build "
            f"without it (peer-memory transports only).")
    return nvshmem_dir, note


def build_requirements(env: Optional[Dict[str, str]] = None) -> List[str]:
    """Extra build requirements of a wheel (PEP 517 ``get_requires_for_build_wheel``): pybind11 and ninja
    always (pyproject.toml lists them too), and ``nvidia-nvshmem-cu<major>`` when the CUDA core will be
    built with NVSHMEM from a wheel (nvcc found, no ``NVSHMEM_DIR``, NVSHMEM not disabled)."""
    env = os.environ if env is None else env
    reqs = ["pybind11>=2.12", "ninja"]
    try:
        build, _ = should_build_core(env)
    except BuildError:
        return reqs  # setup.py reports the bad value
    if build and not env.get("NVSHMEM_DIR") and not nvshmem_disabled(env):
        nvcc = find_nvcc()
        try:
            major = nvcc_version(nvcc)[0] if nvcc is not None else None
        except (OSError, subprocess.SubprocessError, BuildError):
            major = None
        if major is not None:
            reqs.append(env.get("DEEP_EP_NVSHMEM_REQUIREMENT") or _nvshmem_requirement(f"nvidia-nvshmem-cu{major}"))
    return reqs


def _nvshmem_requirement(name: str) -> str:
    """``name==<version>`` when the interpreter's own site-packages (invisible inside pip's isolated build
    environment, but on disk) has that wheel, e.g. the one torch pins: the device code is then linked
    with the same NVSHMEM that is loaded at run time. Else ``name`` (the newest)."""
    import sysconfig
    from importlib import metadata
    paths = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower().replace("_", "-") == name:
            return f"{name}=={dist.version}"
    return name


def should_build_core(env: Optional[Dict[str, str]] = None) -> Tuple[bool, str]:
    """Whether setup.py should build the core, from ``DEEP_EP_BUILD_CUDA`` and nvcc's presence.

    Raises:
        BuildError: ``DEEP_EP_BUILD_CUDA`` is neither 0, 1 nor unset, or it is 1 and nvcc is missing.
    """
    env = os.environ if env is None else env
    request = env.get("DEEP_EP_BUILD_CUDA", "").strip()
    if request not in ("", "0", "1"):
        raise BuildError(f"DEEP_EP_BUILD_CUDA must be 0 or 1, got {request!r}")
    if request == "0":
        return False, "DEEP_EP_BUILD_CUDA=0"
    nvcc = find_nvcc()
    if nvcc is None:
        if request == "1":
            raise BuildError("DEEP_EP_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found (set CUDA_HOME to build the CUDA core)"
    return True, f"nvcc at {nvcc}" + (" (DEEP_EP_BUILD_CUDA=1)" if request == "1" else "")


# ------------------------------------------------------------------------------------ ptxas report

@dataclass
class KernelResources:
    """One function of ptxas' report (``-Xptxas -v``)."""
    name: str
    arch: str = ""
    entry: bool = False
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    demangled: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_RE_FUNC = re.compile(r"Function properties for (\S+)")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_report(text: str) -> List[KernelResources]:
    """Per-function resources from ptxas' verbose output (entries and non-inlined functions)."""
    functions: Dict[Tuple[str, str], KernelResources] = {}
    current: Optional[KernelResources] = None
    arch = ""
    for line in text.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            arch = m.group(2)
            key = (m.group(1), arch)
            current = functions.setdefault(key, KernelResources(m.group(1), arch))
            current.entry = True
            continue
        m = _RE_FUNC.search(line)
        if m:
            key = (m.group(1), arch)
            current = functions.setdefault(key, KernelResources(m.group(1), arch))
            continue
        m = _RE_FRAME.search(line)
        if m and current is not None:
            current.stack_bytes = int(m.group(1))
            current.spill_store_bytes = int(m.group(2))
            current.spill_load_bytes = int(m.group(3))
            continue
        m = _RE_REGS.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
    return list(functions.values())


def _demangle(names: Sequence[str]) -> List[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
        lines = out.splitlines()
        return lines if len(lines) == len(names) else list(names)
    except (OSError, subprocess.SubprocessError):
        return list(names)


def format_report(kernels: Sequence[KernelResources]) -> str:
    rows = [f"{'kind':6} {'arch':6} {'regs':>4} {'stack':>6} {'spill st':>8} {'spill ld':>8}  function"]
    for k in sorted(kernels, key=lambda k: (not k.entry, k.demangled or k.name)):
        name = k.demangled or k.name
        if len(name) > 110:
            name = name[:107] + "..."
        rows.append(f"{'kernel' if k.entry else 'func':6} {k.arch:6} {k.registers:>4} {k.stack_bytes:>6} "
                    f"{k.spill_store_bytes:>8} {k.spill_load_bytes:>8}  {name}")
    return "\n".join(rows)


# -------------------------------------------------------------------------------------------- build

@dataclass
class BuildResult:
    library: Path
    seconds: float
    archs: List[str]
    kernels: List[KernelResources] = field(default_factory=list)
    nvshmem: str = ""
    nvshmem_library: Optional[Path] = None

    @property
    def spilling_kernels(self) -> List[KernelResources]:
        return [k for k in self.kernels if k.entry and k.spills]


def _archs(arch: Optional[str], disable_sm90: bool) -> List[str]:
    if arch is None:
        arch = os.environ.get("DEEP_EP_CUDA_ARCH") or ("80" if disable_sm90 else "90")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in str(arch).replace(";", ",").split(",") if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise BuildError(f"bad CUDA architecture {a!r} (expected e.g. 90 or 80,90)")
    if not disable_sm90 and any(int(a.rstrip("a")) < 90 for a in archs):
        raise BuildError(f"architectures {archs} include pre-Hopper targets: build them with DISABLE_SM90_FEATURES=1")
    return archs


def _run(cmd: List[str], cwd: Path) -> Tuple[int, str]:
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True)
    return proc.returncode, (proc.stdout or "") + (proc.stderr or "")


def _link_nvshmem(nvcc: Path, gencode: List[str], objects: List[Path], nvshmem_dir: Path, obj_dir: Path,
                  library: Path, log) -> Path:
    """Device-link the rdc objects with libnvshmem_device, then link the shared library.

    The host library is linked by SONAME (``-l:libnvshmem_host.so.3``) without an rpath: Python loads
    it from the wheel / ``NVSHMEM_DIR`` first (``deep_ep/_core.py``)."""
    lib_dir = nvshmem_dir / "lib"
    hosts = sorted(p.name for p in lib_dir.glob("libnvshmem_host.so.*"))
    host_name = "libnvshmem_host.so.3" if "libnvshmem_host.so.3" in hosts else hosts[0]
    dlink_obj = obj_dir / "nvshmem_dlink.o"
    dlink = [str(nvcc), "-dlink", "-Xcompiler=-fPIC"] + gencode + [str(o) for o in objects] + \
        [f"-L{lib_dir}", "-lnvshmem_device", "-o", str(dlink_obj)]
    rc, out = _run(dlink, ROOT)
    if rc != 0:
        raise BuildError(f"NVSHMEM device link failed (exit {rc}):\n{' '.join(dlink)}\n{out}")
    tmp_lib = library.with_name(f".{library.name}.tmp{os.getpid()}")
    link = [str(nvcc), "-shared", "-cudart=static"] + gencode + [str(o) for o in objects] + \
        [str(dlink_obj), f"-L{lib_dir}", "-lnvshmem_device", f"-l:{host_name}", "-o", str(tmp_lib)]
    rc, out = _run(link, ROOT)
    if rc != 0:
        raise BuildError(f"NVSHMEM library link failed (exit {rc}):\n{' '.join(link)}\n{out}")
    os.replace(tmp_lib, library)
    log(f"[build_core] linked {library.name} (device-linked with {lib_dir}/libnvshmem_device.a, host {host_name} "
        f"by SONAME)")
    return library


def build_core(output_dir: Optional[os.PathLike] = None, arch: Optional[str] = None,
               disable_sm90: Optional[bool] = None, jobs: Optional[int] = None, allow_spills: bool = False,
               verbose: bool = True, build_dir: Optional[os.PathLike] = None, bindings: bool = True) -> BuildResult:
    """Compile ``csrc/**/*.cu`` and link ``libdeep_ep_core.so`` into ``output_dir`` (default ``deep_ep/``).

    Args:
        output_dir: where the library (and ``_core_build.json``) go.
        arch: compute capabilities, e.g. ``"90"`` or ``"80,90"`` (default ``DEEP_EP_CUDA_ARCH``, else 90,
            or 80 with ``disable_sm90``).
        disable_sm90: build without Hopper-only features (default: ``DISABLE_SM90_FEATURES=1``).
        jobs: parallel nvcc processes (default ``DEEP_EP_BUILD_JOBS`` or the CPU count).
        allow_spills: only warn when a kernel spills registers (default: fail).
        verbose: print the commands, ptxas' report and a summary.
        build_dir: where object files go (default a temporary directory).
        bindings: also build the pybind11 modules (`build_bindings`) into ``output_dir``.

    Returns:
        `BuildResult` with the library path, the time taken and ptxas' per-kernel resources.

    Raises:
        BuildError: nvcc missing, a compile/link error, or (unless ``allow_spills``) a spilling kernel.
    """
    start = time.monotonic()
    log = print if verbose else (lambda *a, **k: None)
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda)")
    major, minor = nvcc_version(nvcc)
    if disable_sm90 is None:
        disable_sm90 = os.environ.get("DISABLE_SM90_FEATURES", "0").strip() not in ("", "0")
    archs = _archs(arch, disable_sm90)
    if jobs is None:
        jobs = int(os.environ.get("DEEP_EP_BUILD_JOBS") or os.cpu_count() or 1)
    output_dir = Path(output_dir) if output_dir is not None else ROOT / "deep_ep"
    output_dir.mkdir(parents=True, exist_ok=True)
    nvshmem_dir, nvshmem_note = nvshmem_for_build(major)

    sources = sorted(p for p in CSRC.rglob("*.cu") if NVSHMEM_SOURCES not in p.parents)
    nv_sources = sorted(NVSHMEM_SOURCES.glob("*.cu")) if nvshmem_dir is not None else []
    if not sources:
        raise BuildError(f"no CUDA sources under {CSRC}")
    gencode = []
    for a in archs:
        gencode += [f"--generate-code=arch=compute_{a},code=[sm_{a},compute_{a}]"]
    defines = ["-DNDEBUG"] + (["-DDEEP_EP_DISABLE_SM90_FEATURES"] if disable_sm90 else [])
    # The core never links NVSHMEM (DEEP_EP_HAS_NVSHMEM stays unset); csrc/nvshmem/ becomes libdeep_ep_nvshmem.so.
    common = [str(nvcc), "-std=c++17", "-O3", "-lineinfo", "-Xcompiler=-fPIC,-fvisibility=hidden",
              "-Xptxas=-v", "--expt-relaxed-constexpr", f"-I{CSRC}"] + gencode + defines

    log(f"[build_core] nvcc {major}.{minor} at {nvcc}; archs {archs}{' (DISABLE_SM90_FEATURES)' if disable_sm90 else ''}; "
        f"{len(sources)} sources, {jobs} jobs")
    log(f"[build_core] NVSHMEM: {nvshmem_note}" + (f"; building {NVSHMEM_LIBRARY_NAME}" if nvshmem_dir else
                                                   f"; no {NVSHMEM_LIBRARY_NAME} (low-latency mode over peer memory only)"))
    nv_common: List[str] = []
    if nvshmem_dir is not None:
        nv_common = common + ["-rdc=true", f"-I{nvshmem_dir / 'include'}"]

    tmp_ctx = tempfile.TemporaryDirectory(prefix="deep_ep_core_") if build_dir is None else None
    obj_dir = Path(tmp_ctx.name) if tmp_ctx is not None else Path(build_dir)
    obj_dir.mkdir(parents=True, exist_ok=True)
    try:
        def compile_one(src: Path) -> Tuple[Path, int, str, Path]:
            obj = obj_dir / (str(src.relative_to(CSRC)).replace(os.sep, "_") + ".o")
            flags = nv_common if NVSHMEM_SOURCES in src.parents else common
            rc, out = _run(flags + ["-c", str(src), "-o", str(obj)], ROOT)
            return src, rc, out, obj

        outputs: List[str] = []
        objects: List[Path] = []
        nv_objects: List[Path] = []
        failures: List[str] = []
        # The slow NVSHMEM (rdc) sources first, so that they overlap with the core's.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for src, rc, out, obj in pool.map(compile_one, nv_sources + sources):
                rel = src.relative_to(ROOT)
                outputs.append(out)
                (nv_objects if NVSHMEM_SOURCES in src.parents else objects).append(obj)
                if rc != 0:
                    failures.append(f"--- {rel} (exit {rc})\n{out}")
                else:
                    log(f"[build_core] compiled {rel}")
        if failures:
            raise BuildError("compilation failed:\n" + "\n".join(failures))

        tmp_lib = output_dir / f".{LIBRARY_NAME}.tmp{os.getpid()}"
        link = [str(nvcc), "-shared", "-cudart=static"] + gencode + [str(o) for o in objects] + ["-o", str(tmp_lib)]
        rc, out = _run(link, ROOT)
        if rc != 0:
            raise BuildError(f"link failed (exit {rc}):\n{' '.join(link)}\n{out}")
        library = output_dir / LIBRARY_NAME
        # Atomic replace: a process that has the old library mapped keeps its copy intact.
        os.replace(tmp_lib, library)
        nv_library = output_dir / NVSHMEM_LIBRARY_NAME
        if nvshmem_dir is None:
            if nv_library.exists():  # a stale one from an earlier build would not match this core
                nv_library.unlink()
            nv_library = None
        else:
            nv_library = _link_nvshmem(nvcc, gencode, nv_objects, nvshmem_dir, obj_dir, nv_library, log)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()

    kernels = parse_ptxas_report("\n".join(outputs))
    for k, name in zip(kernels, _demangle([k.name for k in kernels])):
        k.demangled = name
    result = BuildResult(library=library, seconds=time.monotonic() - start, archs=archs, kernels=kernels,
                         nvshmem=nvshmem_note, nvshmem_library=nv_library)
    log("[build_core] ptxas resource report (registers / stack / spills per function):")
    log(format_report(kernels))
    spilling = result.spilling_kernels
    info = {
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nvcc": f"{major}.{minor}", "archs": archs, "disable_sm90_features": disable_sm90,
        "nvshmem": nvshmem_note, "nvshmem_linked": nv_library is not None,
        "nvshmem_library": nv_library.name if nv_library is not None else None,
        "nvshmem_dir": str(nvshmem_dir) if nvshmem_dir is not None else None, "seconds": round(result.seconds, 1),
        "kernels": [asdict(k) for k in kernels if k.entry],
    }
    if bindings:
        modules = build_bindings(output_dir, verbose=verbose)
        info["binding_modules"] = sorted(p.name for p in modules.values())
    (output_dir / BUILD_INFO_NAME).write_text(json.dumps(info, indent=1) + "\n")
    if spilling:
        names = ", ".join(k.demangled or k.name for k in spilling)
        msg = f"{len(spilling)} kernel(s) spill registers: {names}"
        if not allow_spills:
            raise BuildError(msg + " (pass allow_spills=True / --allow-spills to accept)")
        log(f"[build_core] WARNING: {msg}")
    else:
        log(f"[build_core] no kernel spills ({sum(k.entry for k in kernels)} kernels checked)")
    log(f"[build_core] built {library} in {result.seconds:.1f} s")
    return result


# ------------------------------------------------------------------------------- pybind11 binding

def c_struct_fields(header_text: str, struct: str) -> List[str]:
    """Field names of ``typedef struct <struct> { ... } <struct>;`` in a C header, in order.

    The binding (``csrc/python/core_binding.cpp``) binds exactly these fields, so a field added to the
    header appears in Python after a rebuild with no hand-kept list (the C++ compiler takes each
    field's type from the header)."""
    text = re.sub(r"/\*.*?\*/", " ", header_text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    m = re.search(r"typedef\s+struct\s+" + re.escape(struct) + r"\s*\{(.*?)\}\s*" + re.escape(struct) + r"\s*;",
                  text, flags=re.S)
    if m is None:
        raise BuildError(f"struct {struct} not found in the header")
    names: List[str] = []
    for decl in m.group(1).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        head = re.match(r"(?:(?:const|volatile|unsigned|signed|struct|enum)\s+)*\w+\s*(.*)$", decl)
        if head is None or not head.group(1):
            raise BuildError(f"cannot parse the field declaration {decl!r} of {struct}")
        for part in head.group(1).split(","):
            fm = re.fullmatch(r"\s*[\*\s]*(?:const\s+)?(\w+)\s*(?:\[[^\]]+\])?\s*", part)
            if fm is None:
                raise BuildError(f"cannot parse the field declarator {part!r} of {struct}")
            names.append(fm.group(1))
    return names


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_struct_fields_header(out_dir: Path) -> Path:
    """``deep_ep_struct_fields.h``: one X-macro per bound struct listing its fields (from the headers)."""
    lines = ["/* Generated by build_core.py from the csrc/ headers: do not edit. */", "#pragma once"]
    for struct, header in BOUND_STRUCTS.items():
        fields = c_struct_fields((CSRC / header).read_text(), struct)
        lines.append(f"#define DEEP_EP_FIELDS_{struct}(X) " + " ".join(f"X({f})" for f in fields))
    path = out_dir / "deep_ep_struct_fields.h"
    _write_if_changed(path, "\n".join(lines) + "\n")
    return path


def find_cxx() -> Optional[str]:
    """The C++ compiler for the binding: ``CXX``, else ``c++`` / ``g++`` on PATH."""
    for cand in (os.environ.get("CXX"), "c++", "g++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def find_ninja() -> Optional[str]:
    """ninja from the ``ninja`` PyPI package or PATH (None: compile without incremental rebuilds)."""
    try:
        import ninja  # type: ignore
        path = Path(ninja.BIN_DIR) / "ninja"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which("ninja")


def binding_module_path(output_dir: Path, module: str) -> Path:
    import sysconfig
    return output_dir / (module + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def build_bindings(output_dir: Optional[os.PathLike] = None, build_dir: Optional[os.PathLike] = None,
                   modules: Optional[Sequence[str]] = None, verbose: bool = True) -> Dict[str, Path]:
    """Compile the pybind11 modules (``csrc/python/*.cpp``) into ``output_dir`` (default ``deep_ep/``).

    The modules are compiled by the C++ compiler against the C headers of ``csrc/`` only (no CUDA, no
    torch headers) and open their library with dlopen at run time (``deep_ep/_core.py`` picks the path),
    so one ``_core_binding`` serves any library built from the same ABI (the CUDA core, or another
    build of the same sources such as a CPU build: ``deep_ep._core.open_core(path)``). They depend on
    the Python version (one build per interpreter), the libraries do not.

    With ninja (PyPI ``ninja`` or PATH) the build is incremental: ``build_dir`` (default
    ``build/binding``) keeps ninja's state and each module is recompiled only when its source, a header
    or the flags change. Returns ``{module: path}``.

    Raises:
        BuildError: no C++ compiler, no pybind11, or a compile error.
    """
    log = print if verbose else (lambda *a, **k: None)
    import sysconfig
    try:
        import pybind11  # type: ignore
    except ImportError as exc:
        raise BuildError("pybind11 is not installed (pip install pybind11; it is in requirements-dev.txt and in "
                         "pyproject.toml's build requirements)") from exc
    cxx = find_cxx()
    if cxx is None:
        raise BuildError("no C++ compiler for the pybind11 binding (set CXX or install g++)")
    # absolute: ninja runs in build_dir (setup.py passes a relative build_lib)
    output_dir = (Path(output_dir) if output_dir is not None else ROOT / "deep_ep").resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if build_dir is None:  # ninja's state, per output directory
        default = output_dir.resolve() == (ROOT / "deep_ep").resolve()
        tag = "" if default else "-" + hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:12]
        build_dir = ROOT / "build" / f"binding{tag}"
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    gen = write_struct_fields_header(build_dir)
    modules = list(modules) if modules is not None else list(BINDING_MODULES)
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall",
             f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", f"-I{CSRC}", f"-I{gen.parent}"]
    outputs = {m: binding_module_path(output_dir, m) for m in modules}
    start = time.monotonic()
    ninja = find_ninja()
    if ninja is not None:
        def q(s: object) -> str:
            return str(s).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")
        lines = ["ninja_required_version = 1.3", f"cxx = {cxx}", f"flags = {' '.join(flags)}",
                 # Written under a temporary name, then renamed: a running process keeps its mapped copy.
                 "rule cxx_module",
                 "  command = $cxx $flags -MMD -MF $out.d $in -o $out.tmp -ldl && mv -f $out.tmp $out",
                 "  depfile = $out.d", "  deps = gcc", "  description = pybind11 module $out", ""]
        for m, out in outputs.items():
            lines.append(f"build {q(out)}: cxx_module {q(BINDING_SOURCES / BINDING_MODULES[m])} | {q(gen)}")
        _write_if_changed(build_dir / "build.ninja", "\n".join(lines) + "\n")
        cmd = [ninja, "-C", str(build_dir)] + [str(o) for o in outputs.values()]
        jobs = os.environ.get("DEEP_EP_BUILD_JOBS")
        if jobs:
            cmd += ["-j", jobs]
        rc, out = _run(cmd, ROOT)
        if rc != 0:
            raise BuildError(f"pybind11 binding build failed (exit {rc}):\n{' '.join(cmd)}\n{out}")
        log(f"[build_core] pybind11 modules ({'up to date' if 'no work to do' in out else 'built'} with ninja): "
            + ", ".join(o.name for o in outputs.values()))
    else:
        for m, out in outputs.items():
            tmp = out.with_name(out.name + ".tmp")
            cmd = [cxx] + flags + [str(BINDING_SOURCES / BINDING_MODULES[m]), "-o", str(tmp), "-ldl"]
            rc, text = _run(cmd, ROOT)
            if rc != 0:
                raise BuildError(f"pybind11 binding build failed (exit {rc}):\n{' '.join(cmd)}\n{text}")
            os.replace(tmp, out)
            log(f"[build_core] compiled {out.name} (no ninja: full rebuild)")
    log(f"[build_core] binding step took {time.monotonic() - start:.1f} s")
    report = output_dir / BUILD_INFO_NAME
    if report.is_file():  # the build report lists the modules next to the libraries (package_outputs)
        try:
            info = json.loads(report.read_text())
            names = sorted(set(info.get("binding_modules", [])) | {o.name for o in outputs.values()})
            if info.get("binding_modules") != names:
                info["binding_modules"] = names
                report.write_text(json.dumps(info, indent=1) + "\n")
        except ValueError:
            pass
    return outputs


def package_outputs(output_dir: os.PathLike, info: Optional[Dict] = None) -> List[Path]:
    """The files a build put into ``output_dir`` that a wheel must carry, from its build report
    (``_core_build.json``): the core, the NVSHMEM library when it was linked, the pybind11 modules and
    the report itself."""
    output_dir = Path(output_dir)
    if info is None:
        report = output_dir / BUILD_INFO_NAME
        info = json.loads(report.read_text()) if report.is_file() else {}
    files = [output_dir / LIBRARY_NAME, output_dir / BUILD_INFO_NAME]
    if info.get("nvshmem_linked"):
        files.append(output_dir / (info.get("nvshmem_library") or NVSHMEM_LIBRARY_NAME))
    files += [output_dir / name for name in info.get("binding_modules", [])]
    return files


# ------------------------------------------------------------------------------ PEP 517 backend
# pyproject.toml names this module as the build backend (backend-path "."): setuptools' backend, plus the
# build requirements that depend on the machine (`build_requirements`: NVSHMEM's wheel when nvcc is
# found), so that an isolated `pip install .` / `pip wheel .` builds both libraries.

def _setuptools_backend():
    from setuptools import build_meta
    return build_meta


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools_backend().get_requires_for_build_wheel(config_settings) + build_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools_backend().get_requires_for_build_editable(config_settings) + build_requirements()


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools_backend().get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _setuptools_backend().prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _setuptools_backend().prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _setuptools_backend().build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _setuptools_backend().build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    return _setuptools_backend().build_sdist(sdist_directory, config_settings)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="where the library goes (default: deep_ep/)")
    parser.add_argument("--arch", default=None, help="compute capabilities, e.g. 90 or 80,90")
    parser.add_argument("--disable-sm90", action="store_true", default=None,
                        help="build without Hopper-only features (like DISABLE_SM90_FEATURES=1)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--allow-spills", action="store_true", help="warn instead of failing on register spills")
    parser.add_argument("--build-dir", default=None, help="keep object files here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--bindings-only", action="store_true",
                        help="only (re)build the pybind11 modules (g++, no nvcc needed)")
    args = parser.parse_args(argv)
    try:
        if args.bindings_only:
            build_bindings(args.output_dir, verbose=not args.quiet)
            return 0
        build_core(args.output_dir, args.arch, args.disable_sm90, args.jobs, args.allow_spills, not args.quiet,
                   args.build_dir)
    except BuildError as exc:
        print(f"[build_core] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
