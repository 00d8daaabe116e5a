#!/usr/bin/env python3
"""Build the emulated (CPU) core: the kernels and runtime of ``csrc/`` compiled with the host C++
compiler against the CUDA kernel emulator in ``csrc/emu/``. No nvcc, libcudart or GPU is needed; only
CUDA's headers for the types (``CUDA_HOME/include``, or the ``nvidia`` pip wheels torch brings).

    python build_emu.py [--flavour plain|asan|tsan|all] [--jobs N]

Outputs ``build/emu/<flavour>/libdeep_ep_core.so`` with the C ABI of ``csrc/deep_ep_core.h`` (the
same as ``deep_ep/libdeep_ep_core.so``); ``deep_ep._core`` loads it when ``DEEP_EP_ENGINE=emulated``
(see `deep_ep.engines.emulated`). Flavours: ``plain`` (-O2), ``asan`` (AddressSanitizer +
UndefinedBehaviorSanitizer), ``tsan`` (ThreadSanitizer; the scheduler itself is built without it and
annotates its fiber switches). Incremental: an object is rebuilt when its source, any header under
``csrc/``, this script or the flags changed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
BUILD = ROOT / "build" / "emu"
LIBRARY_NAME = "libdeep_ep_core.so"
NVSHMEM_LIBRARY_NAME = "libdeep_ep_nvshmem.so"
FLAVOURS = ("plain", "asan", "tsan")

COMMON = ["-std=c++20", "-fPIC", "-pthread", "-g1", "-fno-strict-aliasing", "-ffp-contract=off",
          "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
          "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-Wno-class-memaccess", "-Wno-sign-compare"]
FLAVOUR_FLAGS: Dict[str, List[str]] = {
    "plain": ["-O2"],
    "asan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-DDEEP_EP_EMU_ASAN"],
    "tsan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=thread", "-DDEEP_EP_EMU_TSAN"],
}
LINK_FLAGS: Dict[str, List[str]] = {
    "plain": [],
    "asan": ["-fsanitize=address,undefined"],
    "tsan": ["-fsanitize=thread"],
}


class BuildError(RuntimeError):
    pass


def cuda_include_dir() -> Path:
    """A directory with CUDA's cuda_runtime_api.h / cuda_bf16.h / cuda_fp8.h (headers only)."""
    candidates: List[Path] = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    for sub in ("cu13", "cu12", "cuda_runtime"):
        candidates.append(site / sub / "include")
    for c in candidates:
        if (c / "cuda_runtime_api.h").is_file() and (c / "cuda_bf16.h").is_file() and (c / "cuda_fp8.h").is_file():
            return c
    raise BuildError("build_emu: CUDA headers not found (set CUDA_HOME, or install torch's nvidia wheels); tried "
                     + ", ".join(str(c) for c in candidates))


def sources(csrc: Path = CSRC) -> List[Path]:
    """The core's sources (what build_core.py compiles, minus the NVSHMEM library) and the emulator's."""
    core = sorted(p for p in csrc.rglob("*.cu") if (csrc / "nvshmem") not in p.parents)
    return core + sorted((csrc / "emu").glob("*.cpp"))


def header_stamp(csrc: Path = CSRC) -> str:
    h = hashlib.sha256()
    for p in sorted(list(csrc.rglob("*.cuh")) + list(csrc.rglob("*.h"))):
        h.update(str(p.relative_to(csrc)).encode())
        h.update(p.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def compile_command(src: Path, obj: Path, flavour: str, cuda_inc: Path, cxx: str, csrc: Path = CSRC,
                    extra_includes: Sequence[Path] = ()) -> List[str]:
    flags = list(COMMON) + FLAVOUR_FLAGS[flavour]
    emu = csrc / "emu"
    if flavour == "tsan" and src.parent == emu and src.name == "emu.cpp":
        # The scheduler switches stacks under TSan's feet: it annotates instead of being instrumented.
        flags = [f for f in flags if f != "-fsanitize=thread"]
    lang = ["-x", "c++"] if src.suffix == ".cu" else []
    return [cxx, *lang, *flags, "-DDEEP_EP_EMULATOR", "-include", str(emu / "emu.h"), f"-I{emu / 'include'}",
            *[f"-I{p}" for p in extra_includes], f"-I{csrc}", f"-I{cuda_inc}", "-c", str(src), "-o", str(obj)]


def nvshmem_sources(csrc: Path = CSRC) -> List[Path]:
    """The NVSHMEM library's sources (csrc/nvshmem), the emulator, and the NVSHMEM stand-in."""
    return (sorted((csrc / "nvshmem").glob("*.cu")) + sorted((csrc / "emu").glob("*.cpp"))
            + sorted((csrc / "emu" / "nvshmem").glob("*.cpp")))


def build(flavour: str = "plain", jobs: int = 2, verbose: bool = False, csrc: Path = CSRC,
          out: Optional[Path] = None) -> Path:
    """Build one flavour (incrementally) of the sources under `csrc` into `out` (default
    build/emu/<flavour>): libdeep_ep_core.so and, over the NVSHMEM stand-in, libdeep_ep_nvshmem.so.
    Returns the core's path. (The injected-bug tests build a modified copy.)"""
    if flavour not in FLAVOURS:
        raise BuildError(f"build_emu: unknown flavour {flavour!r} (one of {', '.join(FLAVOURS)})")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"build_emu: no C++ compiler ({cxx})")
    cuda_inc = cuda_include_dir()
    out = out if out is not None else BUILD / flavour
    out.mkdir(parents=True, exist_ok=True)
    lib = _build_library(LIBRARY_NAME, sources(csrc), (), out, flavour, jobs, verbose, csrc, cuda_inc, cxx)
    _build_library(NVSHMEM_LIBRARY_NAME, nvshmem_sources(csrc), (csrc / "emu" / "nvshmem",), out / "nvshmem",
                   flavour, jobs, verbose, csrc, cuda_inc, cxx, lib_dir=out)
    return lib


def _build_library(name: str, srcs: Sequence[Path], extra_includes: Sequence[Path], obj_dir: Path, flavour: str,
                   jobs: int, verbose: bool, csrc: Path, cuda_inc: Path, cxx: str,
                   lib_dir: Optional[Path] = None) -> Path:
    obj_dir.mkdir(parents=True, exist_ok=True)
    lib_dir = lib_dir or obj_dir
    stamp = header_stamp(csrc)
    todo = []
    objects = []
    for src in srcs:
        rel = src.relative_to(csrc)
        obj = obj_dir / (str(rel).replace("/", "__") + ".o")
        key_file = obj.with_suffix(".key")
        cmd = compile_command(src, obj, flavour, cuda_inc, cxx, csrc, extra_includes)
        # Independent of where the tree lives: a modified copy (injected-bug tests) reuses the objects.
        key = hashlib.sha256((stamp + " ".join(cmd).replace(str(csrc), "<csrc>").replace(str(obj_dir), "<out>"))
                             .encode() + src.read_bytes()).hexdigest()
        objects.append(obj)
        if obj.is_file() and key_file.is_file() and key_file.read_text() == key:
            continue
        todo.append((src, obj, key_file, key, cmd))
    lib = lib_dir / name
    if not todo and lib.is_file():
        return lib
    start = time.time()

    def run(item):
        src, obj, key_file, key, cmd = item
        if verbose:
            print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"build_emu ({flavour}): compiling {src} failed:\n{proc.stderr}")
        if proc.stderr.strip():
            print(proc.stderr, file=sys.stderr)
        key_file.write_text(key)
        return src

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for src in pool.map(run, todo):
            print(f"build_emu ({flavour}): compiled {src.relative_to(csrc)}", flush=True)
    version_script = obj_dir / "exports.map"
    version_script.write_text("{ global: deep_ep_*; local: *; };\n")
    tmp = lib.with_suffix(".so.tmp")
    cmd = [cxx, "-shared", "-pthread", "-o", str(tmp), *map(str, objects), f"-Wl,--version-script={version_script}",
           "-Wl,-z,defs" if flavour == "plain" else "-Wl,-z,lazy", *LINK_FLAGS[flavour]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"build_emu ({flavour}): linking {name} failed:\n{proc.stderr}")
    os.replace(tmp, lib)
    print(f"build_emu ({flavour}): {lib} in {time.time() - start:.1f} s", flush=True)
    return lib


def library_path(flavour: str = "plain") -> Path:
    return BUILD / flavour / LIBRARY_NAME


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavour", default="plain", choices=(*FLAVOURS, "all"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        for flavour in FLAVOURS if args.flavour == "all" else (args.flavour,):
            build(flavour, args.jobs, args.verbose)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
