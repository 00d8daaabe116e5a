"""The build and its report: what `pip install .` / `pip wheel .` / `python build_core.py` produce.

* An isolated build asks for NVSHMEM's wheel when nvcc is found (PEP 517 ``get_requires_for_build_wheel``
  of the in-tree backend), so the wheel carries both libraries.
* With nvcc present and NVSHMEM missing, the build fails with a message that says how to get it
  (never a wheel that silently lacks ``libdeep_ep_nvshmem.so``), unless ``DEEP_EP_DISABLE_NVSHMEM=1``.
* The build report (``deep_ep/_core_build.json``) lists what a wheel must carry (`package_outputs`):
  every listed file exists, the NVSHMEM library is there exactly when the report says it was linked,
  and the pybind11 modules are listed.

The isolated `pip wheel .` itself (minutes, network for the build requirements) is behind ``slow``.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_core  # noqa: E402

NVCC = build_core.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_pyproject_uses_the_in_tree_backend():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'build-backend = "build_core"' in text and 'backend-path = ["."]' in text
    for req in ("setuptools", "pybind11", "ninja"):
        assert req in text
    for hook in ("build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
                 "prepare_metadata_for_build_wheel"):
        assert callable(getattr(build_core, hook)), hook


def test_build_requirements_follow_the_machine():
    base = build_core.build_requirements({"DEEP_EP_BUILD_CUDA": "0"})
    assert base == ["pybind11>=2.12", "ninja"]
    assert build_core.build_requirements({"DEEP_EP_DISABLE_NVSHMEM": "1"}) == base
    assert build_core.build_requirements({"NVSHMEM_DIR": "/opt/nvshmem"}) == base
    reqs = build_core.build_requirements({})
    if NVCC is None:
        assert reqs == base
    else:
        major = build_core.nvcc_version(NVCC)[0]
        assert len(reqs) == 3 and reqs[2].startswith(f"nvidia-nvshmem-cu{major}"), reqs
        override = build_core.build_requirements({"DEEP_EP_NVSHMEM_REQUIREMENT": "nvidia-nvshmem-cu13==9.9"})
        assert override[2] == "nvidia-nvshmem-cu13==9.9"


@needs_nvcc
def test_missing_nvshmem_fails_loudly(tmp_path, monkeypatch):
    """nvcc present, NVSHMEM absent: the build stops before compiling and says how to get NVSHMEM."""
    monkeypatch.setenv("NVSHMEM_DIR", str(tmp_path / "no-nvshmem"))
    monkeypatch.delenv("DEEP_EP_DISABLE_NVSHMEM", raising=False)
    with pytest.raises(build_core.BuildError) as info:
        build_core.build_core(output_dir=tmp_path / "out", verbose=False)
    msg = str(info.value)
    assert "NVSHMEM not found" in msg and "pip install nvidia-nvshmem-cu" in msg and "NVSHMEM_DIR" in msg
    assert "DEEP_EP_DISABLE_NVSHMEM=1" in msg
    assert not (tmp_path / "out" / build_core.LIBRARY_NAME).exists()
    monkeypatch.setenv("DEEP_EP_DISABLE_NVSHMEM", "1")
    assert build_core.nvshmem_for_build(13) == (None, "DEEP_EP_DISABLE_NVSHMEM set: libdeep_ep_nvshmem.so not built")


def test_package_outputs_follow_the_report(tmp_path):
    info = {"nvshmem_linked": False, "nvshmem_library": None, "binding_modules": ["_core_binding.x.so"]}
    (tmp_path / build_core.BUILD_INFO_NAME).write_text(json.dumps(info))
    names = [p.name for p in build_core.package_outputs(tmp_path)]
    assert names == [build_core.LIBRARY_NAME, build_core.BUILD_INFO_NAME, "_core_binding.x.so"]
    info.update(nvshmem_linked=True, nvshmem_library=build_core.NVSHMEM_LIBRARY_NAME)
    names = [p.name for p in build_core.package_outputs(tmp_path, info)]
    assert build_core.NVSHMEM_LIBRARY_NAME in names


def test_build_report_of_this_checkout():
    """The report next to the built libraries matches what is on disk (skips when nothing is built)."""
    report = ROOT / "deep_ep" / build_core.BUILD_INFO_NAME
    if not report.is_file():
        pytest.skip("the compiled core is not built here")
    info = json.loads(report.read_text())
    files = build_core.package_outputs(report.parent, info)
    missing = [str(p) for p in files if not p.is_file()]
    assert not missing, f"the build report lists files that are not there: {missing}"
    assert info["nvshmem_linked"] == (report.parent / build_core.NVSHMEM_LIBRARY_NAME).is_file()
    assert any(name.startswith("_core_binding") for name in info.get("binding_modules", [])), \
        "no pybind11 module in the report: run `python build_core.py --bindings-only`"


@pytest.mark.slow
@needs_nvcc
def test_isolated_pip_wheel_carries_both_libraries(tmp_path):
    """`pip wheel .` in an isolated build environment (downloads the build requirements, builds the whole
    core): the wheel has both libraries and both pybind11 modules."""
    env = dict(os.environ, DEEP_EP_BUILD_JOBS="2")
    env.pop("NVSHMEM_DIR", None)
    env.pop("DEEP_EP_DISABLE_NVSHMEM", None)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheel = next(tmp_path.glob("deep_ep-*.whl"))
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist()}
    assert {"libdeep_ep_core.so", "libdeep_ep_nvshmem.so", "_core_build.json"} <= names, names
    assert any(n.startswith("_core_binding") for n in names) and any(n.startswith("_nvshmem_binding") for n in names)
