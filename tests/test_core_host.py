"""CPU tests of the compiled core's host side and of the CUDA engine's plumbing (no GPU needed).

* `import deep_ep` works with and without ``libdeep_ep_core.so``; the loader says why it is missing.
* The pybind11 module binds every function of ``csrc/deep_ep_core.h`` (typed, keyword arguments,
  `CoreError` with the core's message), opens an alternative build of the same ABI, and its call
  structs have the headers' fields.
* The index math the kernels run (channel ranges, receive segments, ring arithmetic, expert
  alignment, the NVLink buffer layout) is exported by the library as ``__host__ __device__`` code and
  checked here against the global-view reference (``tests/reference.py``).
* ptxas report parsing and the ``DEEP_EP_BUILD_CUDA`` switch of ``build_core.py``.
* Without a GPU the CUDA engine reports itself unavailable, with the reason, on every rank, and
  ``DEEP_EP_ENGINE=cuda`` fails with a clear error.

Tests that need the built library skip when it is absent (build it with ``python build_core.py``).
The full build itself is behind the ``slow`` marker (CI builds the core separately).
"""

import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reference as ref
from dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_core  # noqa: E402  (repository root on sys.path)
from deep_ep import _core  # noqa: E402

HEADER = ROOT / "csrc" / "deep_ep_core.h"
LIB = _core.load()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"compiled core not built: {_core.load_error()}")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def _python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=120)


# ------------------------------------------------------------------------------------- loading

def test_import_without_core():
    code = (
        "import deep_ep\n"
        "from deep_ep import _core\n"
        "from deep_ep.engines import cuda\n"
        "assert _core.load() is None\n"
        "err = _core.load_error()\n"
        "assert 'not built' in err and 'build_core.py' in err, err\n"
        "ok, reason, facts = cuda.local_status(1 << 20)\n"
        "assert not ok and 'not built' in reason, reason\n"
        "print('OK')\n")
    proc = _python(code, {"DEEP_EP_CORE_LIB": "/nonexistent/libdeep_ep_core.so"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@needs_lib
def test_import_with_core():
    code = (
        "import deep_ep\n"
        "from deep_ep import _core\n"
        "lib = _core.load()\n"
        "assert lib is not None, _core.load_error()\n"
        "assert lib.abi_version() == _core.ABI_VERSION\n"
        "lim = _core.limits()\n"
        "assert lim['max_ranks'] == 8 and lim['max_topk'] >= 32, lim\n"
        "assert lib.has_nvshmem() is False\n"
        "print('OK', lib.is_sm90())\n")
    proc = _python(code, {})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_stale_library_is_reported(tmp_path):
    bogus = tmp_path / "libdeep_ep_core.so"
    bogus.write_bytes(b"not an ELF file")
    proc = _python("from deep_ep import _core\nassert _core.load() is None\nprint(_core.load_error())",
                   {"DEEP_EP_CORE_LIB": str(bogus)})
    assert proc.returncode == 0 and "cannot be loaded" in proc.stdout, proc.stdout + proc.stderr


def _header_functions(path=HEADER, macro="DEEP_EP_CORE_API"):
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    functions = {}
    for m in re.finditer(macro + r"\s+([\w\s\*]+?)\s*\b(deep_ep_\w+)\s*\(([^)]*)\)\s*;", text):
        args = m.group(3).strip()
        functions[m.group(2)] = 0 if args in ("", "void") else len(args.split(","))
    return functions


def _bound_functions(source: str, macro: str):
    text = (ROOT / "csrc" / "python" / source).read_text()
    block = re.search(r"#define " + macro + r"\(X\)(.*?)\n\n", text, flags=re.S)
    assert block, f"{macro} not found in {source}"
    return set(re.findall(r"X\((deep_ep_\w+)\)", block.group(1)))


def test_binding_covers_every_header_function():
    """The pybind11 modules bind exactly the functions the headers export (their types come from the
    headers: a changed signature is a compile error of the binding)."""
    ll = _header_functions(HEADER.with_name("deep_ep_ll.h"), "DEEP_EP_LL_API")
    assert ll, "no functions parsed from deep_ep_ll.h"
    header = dict(_header_functions(), **{k: v for k, v in ll.items() if not k.startswith("deep_ep_nvshmem_")})
    nvshmem = {k for k in ll if k.startswith("deep_ep_nvshmem_")}
    assert header and nvshmem, "no functions parsed from the headers"
    core = _bound_functions("core_binding.cpp", "DEEP_EP_CORE_FUNCTIONS")
    assert core == set(header), core ^ set(header)
    nv = _bound_functions("nvshmem_binding.cpp", "DEEP_EP_NVSHMEM_FUNCTIONS")
    assert nv == nvshmem, nv ^ nvshmem


def test_no_ctypes_left():
    """The compiled libraries are reached through the pybind11 modules only."""
    for path in sorted((ROOT / "deep_ep").rglob("*.py")):
        assert "ctypes" not in path.read_text(), f"{path} uses ctypes"


@needs_lib
def test_binding_struct_fields_follow_the_headers():
    for cls, struct, header in ((_core.LLCall, "deep_ep_ll_call", "deep_ep_ll.h"),
                                (_core.InternodeCall, "deep_ep_internode_call", "deep_ep_internode.h")):
        fields = build_core.c_struct_fields((ROOT / "csrc" / header).read_text(), struct)
        assert list(cls.fields) == fields, "stale binding: rebuild with `python build_core.py --bindings-only`"
    assert LIB.ll_call_bytes() == _core.LLCall.size
    assert LIB.internode_call_bytes() == _core.InternodeCall.size
    c = _core.InternodeCall()
    assert c.op == 0 and c.x == 0 and list(c.nvl_peers) == [0] * _core.INTERNODE_MAX_PEERS
    c.nvl_peers[3] = 0xDEAD0000
    c.x = None
    c.row_bytes = 1 << 40
    assert c.nvl_peers[3] == 0xDEAD0000 and c.x == 0 and c.row_bytes == 1 << 40
    c.rdma_peers = list(range(_core.INTERNODE_MAX_PEERS))
    assert list(c.rdma_peers) == list(range(_core.INTERNODE_MAX_PEERS))
    with pytest.raises(ValueError, match="rdma_peers"):
        c.rdma_peers = [1, 2]
    with pytest.raises(TypeError, match="num_tokens"):
        c.num_tokens = 1 << 40  # int32 field
    with pytest.raises(TypeError, match="num_tokens"):
        c.num_tokens = 1.5
    with pytest.raises(IndexError):
        c.nvl_peers[_core.INTERNODE_MAX_PEERS] = 1


def test_fake_struct_parsing():
    header = """typedef struct s { int a, *b; /* c */ const int64_t* d; // e
        void* f[8]; uint64_t g[2], h; } s;"""
    assert build_core.c_struct_fields(header, "s") == ["a", "b", "d", "f", "g", "h"]
    with pytest.raises(build_core.BuildError, match="not found"):
        build_core.c_struct_fields(header, "t")


@needs_lib
def test_core_calls_fail_cleanly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(_core.CoreError, match="deep_ep_core_device_count: .*cudaGetDeviceCount"):
        LIB.device_count()
    assert "cudaGetDeviceCount" in _core.last_error()
    with pytest.raises(_core.CoreError, match="deep_ep_runtime_create: .*CUDA call"):
        LIB.runtime_create(rank=0, num_ranks=2, device=0, num_nvl_bytes=1 << 20, timeout_s=10.0)
    assert issubclass(_core.CoreError, RuntimeError)


# cudaError_t values (driver_types.h; stable across CUDA 12 and 13)
_CUDA_ERROR_INVALID_VALUE = 1
_CUDA_ERROR_MEMORY_ALLOCATION = 2
_CUDA_ERROR_INVALID_CONFIGURATION = 9


def _replay_launch_check(*script: int):
    """(0, "") when the replayed launch check passes, else (-1, the core's message)."""
    try:
        LIB.core_host_replay_launch_check(list(script))
    except _core.CoreError as exc:
        return -1, str(exc)
    return 0, ""


@needs_lib
def test_launch_check_ignores_errors_left_by_earlier_calls():
    """An entry point's launch check reports its own launch's error, never one left pending on the thread
    by earlier work (a teardown, an ignored call): the replay runs the entry points' wrapper and the check
    with a scripted cudaGetLastError (first value: pending at entry; second: after the launch)."""
    rc, err = _replay_launch_check(_CUDA_ERROR_INVALID_VALUE, 0)
    assert rc == 0, f"a stale error was reported as the launch's: {err}"
    rc, err = _replay_launch_check(_CUDA_ERROR_MEMORY_ALLOCATION, _CUDA_ERROR_INVALID_CONFIGURATION)
    assert rc == -1 and "cudaErrorInvalidConfiguration" in err and "cudaErrorMemoryAllocation" not in err, err


@needs_lib
def test_launch_check_names_the_kernel():
    rc, err = _replay_launch_check(0, _CUDA_ERROR_INVALID_CONFIGURATION)
    assert rc == -1 and "launch of replayed_kernel failed with cudaErrorInvalidConfiguration" in err, err
    assert _replay_launch_check()[0] == 0


@needs_lib
def test_runtime_argument_errors_name_the_value():
    with pytest.raises(_core.CoreError, match="got 9"):
        LIB.runtime_create(0, 9, 0, 1 << 20, 10.0)
    with pytest.raises(_core.CoreError, match="multiple of 128"):
        LIB.runtime_create(rank=0, num_ranks=2, device=0, num_nvl_bytes=1000, timeout_s=10.0)
    with pytest.raises(_core.CoreError, match="channels"):
        LIB.intranode_buffer_bytes(2, 300, 256, 8, 1024, 4, 0, False)
    with pytest.raises(_core.CoreError, match="multiple of 16"):
        LIB.intranode_buffer_bytes(2, 4, 256, 8, 1000, 4, 0, False)
    with pytest.raises(TypeError):  # typed: a pointer must be an int or None
        LIB.runtime_destroy("not a pointer")
    with pytest.raises(TypeError):
        LIB.runtime_create(rank=0, num_ranks=2)  # missing keyword arguments


@needs_lib
def test_alternative_build_of_the_core(tmp_path):
    """`open_core` binds any library with the core's ABI at another path (e.g. a CPU build); the
    ``DEEP_EP_CORE_LIB`` override selects one for `load()`."""
    alt = tmp_path / "libdeep_ep_core_alt.so"
    shutil.copy(_core.library_path(), alt)
    other = _core.open_core(alt)
    assert other is not LIB and other.path == str(alt.resolve()) and other is _core.open_core(alt)
    assert other.host_aligned_count(count=5, alignment=4) == 8
    proc = _python("from deep_ep import _core\nlib = _core.load()\nprint('PATH', lib.path)", {"DEEP_EP_CORE_LIB": str(alt)})
    assert proc.returncode == 0 and f"PATH {alt.resolve()}" in proc.stdout, proc.stdout + proc.stderr


def test_missing_binding_module_is_reported(tmp_path):
    """Without the pybind11 module (another Python, or not built) load() says how to build it."""
    pkg = tmp_path / "deep_ep"
    shutil.copytree(ROOT / "deep_ep", pkg, ignore=shutil.ignore_patterns("_core_binding*", "_nvshmem_binding*",
                                                                           "__pycache__"))
    # the venv's editable install (make setup) would otherwise find the module of the real checkout
    code = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "from deep_ep import _core\nassert _core.load() is None\nprint(_core.load_error())\n"
            "assert issubclass(_core.CoreError, RuntimeError)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if (pkg / "libdeep_ep_core.so").is_file():
        assert "_core_binding" in proc.stdout and "--bindings-only" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------- index math

@needs_lib
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 31, 64, 100, 4097])
@pytest.mark.parametrize("num_channels", [1, 3, 10, 24, 128])
def test_channel_range(num_tokens, num_channels):
    expected = ref.channel_ranges(num_tokens, num_channels)
    for c in range(num_channels):
        assert LIB.host_channel_range(num_tokens, num_channels, channel=c) == expected[c], (num_tokens, num_channels, c)


@needs_lib
def test_aligned_count_and_ring_free_slots():
    for count in (0, 1, 7, 8, 9, 1000):
        for a in (1, 3, 8, 128):
            assert LIB.host_aligned_count(count, a) == (count + a - 1) // a * a
    assert LIB.host_ring_free_slots(10, 4, 8) == 2
    assert LIB.host_ring_free_slots(tail=4, head=4, capacity=8) == 8
    assert LIB.host_ring_free_slots(12, 4, 8) == 0


def _int_array(t: torch.Tensor):
    return t.to(torch.int32).contiguous().view(-1).tolist()


@needs_lib
@pytest.mark.parametrize("num_ranks, num_channels", [(2, 1), (3, 4), (4, 10), (8, 3), (5, 7)])
def test_recv_segments_match_reference(num_ranks, num_channels):
    """Rows (src, channel) fill on every rank, from the handle, against recv_src_idx of the reference."""
    gen = torch.Generator().manual_seed(1234 + num_ranks * 10 + num_channels)
    tokens = [int(torch.randint(0, 40, (1,), generator=gen)) for _ in range(num_ranks)]
    in_rank = [torch.rand(t, num_ranks, generator=gen) < 0.45 for t in tokens]
    x = [torch.zeros(t, 8, dtype=torch.bfloat16) for t in tokens]
    per_expert = [torch.zeros(num_ranks, dtype=torch.int32) for _ in range(num_ranks)]
    topo = ref.Topology(num_ranks)
    expected = ref.dispatch(x, in_rank, per_expert, num_ranks, num_channels, topo)
    for r in range(num_ranks):
        handle = expected[r]["handle"]
        rank_prefix, recv_channel_prefix, recv_src_idx = handle[0], handle[2], handle[3]
        rpm, rcp = _int_array(rank_prefix), _int_array(recv_channel_prefix)
        covered = 0
        for s in range(num_ranks):
            ranges = ref.channel_ranges(tokens[s], num_channels)
            for c in range(num_channels):
                row_begin, count = LIB.host_recv_segment(rpm, rcp, num_ranks, num_channels, rank=r, src=s, channel=c)
                lo, hi = ranges[c]
                want = [t for t in range(lo, hi) if in_rank[s][t, r]]
                got = recv_src_idx[row_begin:row_begin + count].tolist()
                assert got == want, (r, s, c)
                covered += count
        assert covered == recv_src_idx.numel()


def _layout(num_ranks, num_channels, num_slots, num_local_experts, row_bytes, num_topk, num_scales, combine):
    return LIB.host_intranode_layout(num_ranks, num_channels, num_slots, num_local_experts, row_bytes, num_topk,
                                     num_scales, combine, num_offsets=_core.NUM_LAYOUT_REGIONS)


@needs_lib
@pytest.mark.parametrize("combine", [False, True])
def test_buffer_layout_regions(combine):
    R, C, Q, E_loc, row, K, S = 8, 10, 256, 32, 7168, 8, 56
    total, off = _layout(R, C, Q, E_loc, row, K, S, combine)
    rings = C * R
    sizes = [R * R * 4, 0 if combine else R * E_loc * 4, R * C * 4, rings * 4, rings * 4, rings * Q * row,
             0 if combine else rings * Q * 4, 0 if combine else rings * Q * K * 4, rings * Q * K * 4,
             0 if combine else rings * Q * S * 4]
    assert off[0] == 0
    for i, size in enumerate(sizes):
        assert off[i] % 128 == 0
        assert off[i + 1] - off[i] == (size + 127) // 128 * 128, f"region {i}"
    assert total == off[-1]
    assert LIB.intranode_buffer_bytes(R, C, Q, E_loc * R, row, K, S, combine) == total


@needs_lib
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("fp8", [False, True])
def test_buffer_needs_at_most_the_size_hint(num_ranks, fp8):
    """A buffer sized with Config.get_nvl_buffer_size_hint (DeepEP's formula) fits both kernels."""
    import deep_ep
    hidden = 7168
    row_bytes = hidden * (1 if fp8 else 2)
    for config in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)):
        hint = config.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
        C, Q = config.num_sms // 2, config.num_max_nvl_chunked_recv_tokens
        need_dispatch = LIB.intranode_buffer_bytes(num_ranks, C, Q, 256, row_bytes, 8, hidden // 128 if fp8 else 0,
                                                   is_combine=False)
        need_combine = LIB.intranode_buffer_bytes(num_ranks, C, Q, 0, hidden * 2, 8, 0, is_combine=True)
        assert 0 < need_dispatch <= hint and 0 < need_combine <= hint, (need_dispatch, need_combine, hint)


# ----------------------------------------------------------------------------------- the build

PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelv
    40 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 80 registers, used 16 barriers, 40 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_parse_ptxas_report():
    kernels = {k.name: k for k in build_core.parse_ptxas_report(PTXAS_SAMPLE)}
    assert set(kernels) == {"_Z6kernelv", "_Z5otherv", "_Z6helperv"}
    k = kernels["_Z6kernelv"]
    assert k.entry and k.registers == 80 and k.stack_bytes == 40 and k.spills
    assert (k.spill_store_bytes, k.spill_load_bytes) == (8, 12)
    assert kernels["_Z5otherv"].entry and not kernels["_Z5otherv"].spills
    assert not kernels["_Z6helperv"].entry
    assert "kernel" in build_core.format_report(list(kernels.values()))


def test_should_build_core_switch():
    assert build_core.should_build_core({"DEEP_EP_BUILD_CUDA": "0"}) == (False, "DEEP_EP_BUILD_CUDA=0")
    with pytest.raises(build_core.BuildError, match="must be 0 or 1"):
        build_core.should_build_core({"DEEP_EP_BUILD_CUDA": "yes"})
    build, reason = build_core.should_build_core({})
    assert build == (build_core.find_nvcc() is not None), reason


def test_arch_selection():
    assert build_core._archs(None, False) in (["90"], [os.environ.get("DEEP_EP_CUDA_ARCH")])
    assert build_core._archs("80", True) == ["80"]
    assert build_core._archs("sm_90,90a", False) == ["90", "90a"]
    with pytest.raises(build_core.BuildError, match="DISABLE_SM90_FEATURES"):
        build_core._archs("80", False)
    with pytest.raises(build_core.BuildError, match="bad CUDA architecture"):
        build_core._archs("hopper", False)


@pytest.mark.slow
@pytest.mark.skipif(build_core.find_nvcc() is None, reason="nvcc not found")
def test_build_core_from_scratch(tmp_path):
    """The whole build (about a minute on 2 cores): compiles, links, and no kernel spills."""
    result = build_core.build_core(output_dir=tmp_path, verbose=False)
    assert result.library.is_file()
    assert not result.spilling_kernels
    names = " ".join(k.demangled for k in result.kernels if k.entry)
    for kernel in ("dispatch_kernel", "combine_kernel", "notify_dispatch_kernel", "cached_notify_kernel",
                   "get_dispatch_layout_kernel", "prepare_kernel", "dispatch_recv_kernel", "combine_recv_kernel",
                   "dispatch_send_kernel<deep_ep::transport::PeerTransport>",
                   "combine_send_kernel<deep_ep::transport::PeerTransport>"):
        assert kernel in names
    if build_core.find_nvshmem()[0] is not None:  # the wheel is installed (CI): the NVSHMEM library too
        assert result.nvshmem_library is not None and result.nvshmem_library.is_file()
        assert "NvshmemTransport" in names


# ------------------------------------------------------------------------- engine choice, no GPU

def _probe_worker(rank, num_ranks, group):
    import deep_ep
    from deep_ep._comm import Communicator
    from deep_ep.engines import cuda

    comm = Communicator(group)
    ok, reason, _ = cuda.probe(comm, num_ranks, 1 << 20)
    comm.close()
    os.environ["DEEP_EP_ENGINE"] = "cuda"
    try:
        deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
        forced = "no error"
    except RuntimeError as exc:
        forced = str(exc)
    finally:
        os.environ.pop("DEEP_EP_ENGINE", None)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, explicitly_destroy=True)
    result = (ok, reason, forced, buffer.engine, buffer.engine_reason)
    buffer.destroy()
    return result


@no_gpu
def test_cuda_engine_unavailable_without_gpu():
    results = run_ranks(_probe_worker, 2, timeout_s=180)
    for ok, reason, forced, engine, engine_reason in results:
        assert not ok
        assert reason.startswith("rank 0: "), reason
        assert ("no CUDA device" in reason) or ("not built" in reason), reason
        assert "DEEP_EP_ENGINE=cuda" in forced and "CUDA engine is not available" in forced, forced
        assert engine == "portable"
        assert engine_reason, "the Buffer must say why it chose the portable engine"
    assert results[0][1] == results[1][1], "every rank must report the same reason"


@needs_lib
def test_binding_releases_the_gil():
    """A long call into the library lets other Python threads run. With a huge switch interval a thread
    that holds the GIL is never preempted, so the main thread, sleeping while the worker loops over
    calls, can wake up before the worker finishes only if the calls release the GIL."""
    import threading
    import time

    n = 1 << 22
    x = torch.randn(n).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.uint8)
    scales = torch.empty(n // 128, dtype=torch.float32)
    start, state = threading.Event(), {"done": False}
    ptrs = (x.view(torch.int16).data_ptr(), out.data_ptr(), scales.data_ptr())  # torch calls may drop the GIL

    def worker():
        start.wait()
        for _ in range(30):
            LIB.ll_host_fp8_cast(ptrs[0], n, False, ptrs[1], ptrs[2])
        state["done"] = True

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        start.set()
        time.sleep(0.05)                  # releases the GIL: the worker enters its calls
        done_when_main_woke = state["done"]
    finally:
        sys.setswitchinterval(old)
    thread.join()
    assert state["done"] and not done_when_main_woke, "the binding held the GIL during the library calls"
