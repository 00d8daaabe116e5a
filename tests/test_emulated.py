"""The real CUDA kernels of ``csrc/``, executed on the CPU by the kernel emulator (``csrc/emu/``,
``build_emu.py``) and driven by the CUDA engine's own host code (``DEEP_EP_ENGINE=emulated``), compared
bit for bit with the portable engine; plus the emulator's own tests: one injected bug per class it
must diagnose, each in a copy of a real kernel source.

Needs g++ and CUDA's headers (``/usr/local/cuda/include`` or torch's ``nvidia`` wheels); no GPU, nvcc
or libcudart. The library is built (incrementally) once per session.
"""

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "tests" / "gpu", ROOT / "tests", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import build_emu  # noqa: E402
from dist_utils import make_seed, run_ranks  # noqa: E402
from intranode_cases import CASES, Case, intranode_worker  # noqa: E402
import internode_cases  # noqa: E402
import ll_cases  # noqa: E402

from deep_ep.engines import emulated  # noqa: E402

EMU_ENV = {"DEEP_EP_ENGINE": "emulated", "DEEP_EP_TIMEOUT_S": "60", "DEEP_EP_EMU_WATCHDOG_S": "60"}


def _build_or_skip(flavour: str = "plain") -> Path:
    try:
        return build_emu.build(flavour)
    except build_emu.BuildError as exc:
        if "not found" in str(exc) or "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def emu_lib() -> Path:
    return _build_or_skip("plain")


# ------------------------------------------------------------------------------ one kernel source
CSRC = ROOT / "csrc"


def _code_lines(path: Path):
    """(line number, text without // comments and string literals) of a C++ source."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
        yield i, line.split("//", 1)[0]


def test_inline_asm_only_in_ptx_header():
    """PTX lives in kernels/ptx.cuh only (the one file with an emulated branch)."""
    offenders = []
    for path in sorted(list(CSRC.rglob("*.cu")) + list(CSRC.rglob("*.cuh")) + list(CSRC.rglob("*.h"))):
        if path.name == "ptx.cuh" or "emu" in path.relative_to(CSRC).parts:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, text in _code_lines(path) if re.search(r"\basm\b", text)]
    assert not offenders, "inline asm outside csrc/kernels/ptx.cuh: " + ", ".join(offenders)


def test_no_raw_kernel_launch():
    """Every launch goes through DEEP_EP_LAUNCH (ptx.cuh), so the emulated build can run it."""
    offenders = []
    for path in sorted(list(CSRC.rglob("*.cu")) + list(CSRC.rglob("*.cuh"))):
        if path.name == "ptx.cuh":
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, text in _code_lines(path) if "<<<" in text]
    assert not offenders, "raw <<<...>>> launch (use DEEP_EP_LAUNCH): " + ", ".join(offenders)


def test_source_checks_catch_offenders(tmp_path):
    """The two checks above do fail on an offending line."""
    bad = tmp_path / "bad.cu"
    bad.write_text('// asm in a comment is fine\nconst char* s = "asm";\nkernel<<<1, 32, 0, s>>>(x);\nasm volatile("trap;");\n')
    lines = dict(_code_lines(bad))
    assert "<<<" in lines[3] and re.search(r"\basm\b", lines[4])
    assert not re.search(r"\basm\b", lines[1]) and not re.search(r"\basm\b", lines[2])


# --------------------------------------------------------------------------- kernels vs portable
def _run_intranode(num_ranks: int, cases, env=None, timeout_s: float = 240):
    seed = make_seed()
    start = time.monotonic()
    failures = run_ranks(intranode_worker, num_ranks, seed, cases, False, timeout_s=timeout_s,
                         env={**EMU_ENV, **(env or {})})
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])
    return time.monotonic() - start


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_intranode_emulated_matches_portable(emu_lib, num_ranks):
    """Layout, dispatch (BF16, FP8 + scales, top-k or none, alignment, worst tokens, zero-token rank,
    all -1, small rings), cached dispatch and combine (weights, biases), every handle field."""
    _run_intranode(num_ranks, CASES)


def test_intranode_emulated_8_ranks(emu_lib):
    _run_intranode(8, [CASES[0], CASES[3], CASES[5]], timeout_s=300)


def test_intranode_emulated_small_rings_random_schedule(emu_lib):
    """The smallest rings Config allows (2 slots, chunks of 1 token: the sender waits for the receiver
    after almost every token) under random fiber scheduling."""
    one_slot = [Case("2-slot rings, chunks of 1", tokens=(23, 17, 30), config=(4, 1, 2), worst_extra=None),
                Case("2-slot rings, fp8", tokens=(12, 20, 9), hidden=256, fp8=True, config=(2, 1, 2),
                     worst_extra=2)]
    _run_intranode(3, one_slot, env={"DEEP_EP_EMU_SEED": str(make_seed() % 100000 + 1)})


@pytest.mark.parametrize("num_nodes,ranks_per_node,cases", [
    (2, 2, None),       # every case
    (2, 3, (0, 3, 5)),
    (2, 4, (0,)),
    (4, 1, (0, 3)),
    (4, 2, (0,)),
])
def test_internode_emulated_matches_portable(emu_lib, num_nodes, ranks_per_node, cases):
    """Two-hop notify/dispatch/combine over peer memory with virtual nodes: every output and all 10
    handle fields (internode_cases.py)."""
    chosen = internode_cases.CASES if cases is None else [internode_cases.CASES[i] for i in cases]
    seed = make_seed()
    failures = run_ranks(internode_cases.internode_worker, num_nodes * ranks_per_node, seed, chosen, False,
                         ranks_per_node=ranks_per_node, timeout_s=300, env=EMU_ENV)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_low_latency_emulated_matches_portable(emu_lib, num_ranks):
    """LL dispatch BF16 / FP8 / round_scale / UE8M0, top-16 with duplicates, hook, zero-copy combine with
    out=, LogFMT, hidden 7168, shrink masks (ll_cases.py: every case, the engines side by side), over
    peer memory."""
    seed = make_seed()
    failures = run_ranks(ll_cases.ll_worker, num_ranks, seed, "peer", ll_cases.LL_CASES, True, timeout_s=300,
                         env=EMU_ENV)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


def test_low_latency_emulated_through_buffer(emu_lib):
    """deep_ep.Buffer(low_latency_mode=True) picks the emulated LL engine; async_finish and hook calls."""
    seed = make_seed()
    failures = run_ranks(ll_cases.buffer_worker, 2, seed, "peer", timeout_s=300, env=EMU_ENV)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


def _ll_shape_change_worker(rank, num_ranks, group, seed):
    """A large LL shape, then a smaller one that reuses the workspace, with every non-header word of
    the workspace first set to the epoch the next call will use (what stale words of the old layout
    may happen to hold)."""
    from intranode_cases import Checker
    big = ll_cases.LLCase("big", tokens=(40, 64, 17), t_max=64, experts_per_rank=4)
    small = ll_cases.LLCase("small after big", tokens=(30, 9, 32), t_max=32, experts_per_rank=3, fp8=True)
    chk = Checker(rank)
    engines = ll_cases.make_engines(group, "peer", ll_cases.rdma_bytes_for([big, small], num_ranks))
    cuda = engines[0]
    chk.prefix = "big"
    ll_cases.run_ll_case(engines, rank, num_ranks, big, seed, chk)
    ws = cuda._workspace
    ws[32:] = int(ws[cuda._slot]) + 1  # DEEP_EP_LL_WS_HEADER = 32; the next dispatch's epoch
    chk.prefix = "small after big"
    ll_cases.run_ll_case(engines, rank, num_ranks, small, seed + 1, chk)
    engines[0].destroy(collective=True)
    engines[2].close()
    return chk.failures


def test_low_latency_emulated_shape_changes(emu_lib):
    """Regression (found by the emulator): a smaller (T_max, num_experts) reused the LL workspace with
    the old layout's words in place; one equal to the next epoch released the receive blocks of parts
    > 0 before part 0 had written the counts (rows marked -1, zero payloads)."""
    seed = make_seed()
    failures = run_ranks(_ll_shape_change_worker, 3, seed, timeout_s=300, env=EMU_ENV)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


def test_resident_block_cap(emu_lib):
    """DEEP_EP_EMU_MAX_RESIDENT_BLOCKS: at the occupancy the host code assumes (every block of the
    grid resident) the ring protocol completes; with one resident block, the dispatch's senders and
    receivers are never co-resident and the kernel's own bounded wait reports it."""
    case = Case("cap", tokens=(40, 30), config=(2, 2, 4), worst_extra=None)
    _run_intranode(2, [case], env={"DEEP_EP_EMU_MAX_RESIDENT_BLOCKS": "2"})
    results = run_ranks(_bug_worker, 2, 5, case, timeout_s=120,
                        env={**EMU_ENV, "DEEP_EP_EMU_MAX_RESIDENT_BLOCKS": "1", "DEEP_EP_TIMEOUT_S": "2"})
    for text in results:
        assert "deep_ep timeout in intranode dispatch: dispatch sender (waiting for free slots)" in text, text


def test_watchdog_names_the_spin_points(emu_lib, tmp_path):
    """With the kernels' own timeout far away, the watchdog reports every block's threads: which spin
    on which address at which line, which wait at barriers."""
    site = "if (team.warp_in_team == 0 && lane == 0) ptx::st_release_sys_global(head_ptr, tail);"
    lib = _with_bug(tmp_path, DISPATCH, site, "(void)head_ptr;")
    results = _diagnoses(lib, env={"DEEP_EP_TIMEOUT_S": "600", "DEEP_EP_EMU_WATCHDOG_S": "3"})
    for text in results:
        assert "deep_ep emulator watchdog: no progress for 3 s" in text, text
        assert re.search(r"last spin point csrc/kernels/intranode_dispatch.cu:\d+ on address 0x[0-9a-f]+", text), text
        assert "kernel dispatch_kernel" in text, text


def _worst_overflow_worker(rank, num_ranks, group, seed):
    """A num_worst_tokens dispatch that cannot hold what a rank receives: the next call raises on
    every rank (the kernels flag it; the engine reads the flag after the notify)."""
    import deep_ep
    from intranode_cases import build_inputs, make_buffers
    case = Case("overflow", tokens=(40, 30))
    buf, port = make_buffers(group)
    topk_idx, topk_weights, x = build_inputs(case, num_ranks, rank, seed, torch.device("cpu"))
    num_experts = case.experts_per_rank * num_ranks
    lay = port.get_dispatch_layout(topk_idx, num_experts)
    config = deep_ep.Config(*case.config, 6, 128)
    buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                 topk_idx=topk_idx, topk_weights=topk_weights, config=config, num_worst_tokens=5)
    try:
        buf.get_dispatch_layout(topk_idx, num_experts)
        outcome = "no error"
    except RuntimeError as exc:
        outcome = str(exc)
    buf.destroy()
    port.destroy()
    return outcome


def test_intranode_emulated_worst_tokens_overflow(emu_lib):
    results = run_ranks(_worst_overflow_worker, 2, make_seed(), timeout_s=120, env=EMU_ENV)
    for text in results:
        assert "an earlier dispatch with num_worst_tokens=5 overflowed" in text, text


def _ll_clean_worker(rank, num_ranks, group, seed):
    """clean_low_latency_buffer between LL calls of two shapes on one emulated Buffer."""
    import deep_ep
    case = ll_cases.LLCase("clean", fp8=True)
    num_experts = case.experts_per_rank * num_ranks
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(64, 512, num_ranks, num_experts)
    from intranode_cases import Checker
    buf = deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, explicitly_destroy=True)
    os.environ["DEEP_EP_ENGINE"] = "portable"
    ref = deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, explicitly_destroy=True)
    os.environ["DEEP_EP_ENGINE"] = "emulated"
    chk = Checker(rank)
    chk.true("ll_engine", buf.ll_engine == "emulated", buf.ll_engine_reason)
    for t_max, hidden in ((32, 256), (64, 512)):
        chk.prefix = f"T_max {t_max}, hidden {hidden}"
        x, topk_idx, _ = ll_cases.ll_inputs(ll_cases.LLCase("clean", t_max=t_max, hidden=hidden), num_ranks, rank, seed,
                                            torch.device("cpu"))
        buf.clean_low_latency_buffer(t_max, hidden, num_experts)
        got = buf.low_latency_dispatch(x, topk_idx, t_max, num_experts, use_fp8=False)
        want = ref.low_latency_dispatch(x, topk_idx, t_max, num_experts, use_fp8=False)
        ll_cases._compare_dispatch(chk, got[:3], want[:3], False)
    buf.destroy()
    ref.destroy()
    return chk.failures


def test_low_latency_emulated_clean_buffer(emu_lib):
    results = run_ranks(_ll_clean_worker, 2, make_seed(), timeout_s=120, env=EMU_ENV)
    report = [line for per_rank in results for line in per_rank]
    assert not report, "\n".join(report[:40])


# ---------------------------------------------------------------------------- NVSHMEM stand-in
@pytest.mark.parametrize("no_p2p", ["0", "1"])
def test_low_latency_emulated_over_nvshmem(emu_lib, no_p2p):
    """The NVSHMEM build of the LL send kernels (libdeep_ep_nvshmem.so over the stand-in): the
    nvshmem_ptr fast path, and (no_p2p=1) puts that land only at the warp's quiet, plus atomics."""
    seed = make_seed()
    failures = run_ranks(ll_cases.ll_worker, 2, seed, "nvshmem", ll_cases.LL_CASES, False, timeout_s=300,
                         env={**EMU_ENV, "DEEP_EP_EMU_NVSHMEM_NO_P2P": no_p2p})
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


@pytest.mark.parametrize("force_network", ["0", "1"])
def test_internode_emulated_over_nvshmem(emu_lib, force_network):
    """Internode 2 x 2 with the RDMA hop over the NVSHMEM stand-in (DEEP_EP_INTERNODE_FORCE_NETWORK=1:
    puts, quiet, fence and atomic signals instead of load/store)."""
    seed = make_seed()
    failures = run_ranks(internode_cases.internode_worker, 4, seed, internode_cases.CASES, False, ranks_per_node=2,
                         timeout_s=300, env={**EMU_ENV, "DEEP_EP_INTERNODE_TRANSPORT": "nvshmem",
                                             "DEEP_EP_INTERNODE_FORCE_NETWORK": force_network})
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


def _ll_nvshmem_bug_worker(rank, num_ranks, group, seed):
    try:
        failures = ll_cases.ll_worker(rank, num_ranks, group, seed, "nvshmem", [ll_cases.LL_CASES[0]], False)
        return "mismatch: " + "\n".join(failures) if failures else ""
    except Exception as exc:  # noqa: BLE001 - the diagnosis is the result
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.slow  # a header change: both libraries rebuild (~30 s)
def test_bug_missing_nvshmem_quiet(emu_lib, tmp_path):
    """Without the quiet after a warp's puts, the stand-in never delivers them (the signal, set by
    another warp after its own fence, still arrives): the receiver reads rows that never came."""
    lib = _with_bug(tmp_path, "kernels/transport_nvshmem.cuh", "        if (lane == 0) nvshmem_quiet();\n", "")
    results = run_ranks(_ll_nvshmem_bug_worker, 2, 3, timeout_s=180,
                        env={**EMU_ENV, "DEEP_EP_CORE_LIB": str(lib),
                             "DEEP_EP_NVSHMEM_LIB": str(lib.with_name("libdeep_ep_nvshmem.so")),
                             "DEEP_EP_EMU_NVSHMEM_NO_P2P": "1", "DEEP_EP_TIMEOUT_S": "3"})
    assert any(text.startswith("mismatch:") and "handle.src_info" in text for text in results), results


# ---------------------------------------------------------------------------------- injected bugs
def _bug_worker(rank, num_ranks, group, seed, case):
    """Runs one intranode case; returns this rank's error text ('' when it completed)."""
    try:
        failures = intranode_worker(rank, num_ranks, group, seed, [case], False)
        return "mismatch: " + "\n".join(failures) if failures else ""
    except Exception as exc:  # noqa: BLE001 - the diagnosis is the result
        return f"{type(exc).__name__}: {exc}"


def _with_bug(tmp_path: Path, rel: str, old: str, new: str, flavour: str = "plain") -> Path:
    """A copy of csrc/ with `old` replaced by `new` (exactly once) in `rel`, built (reusing the
    unchanged objects of the main build of `flavour`); returns the library."""
    tree = tmp_path / "csrc"
    shutil.copytree(CSRC, tree)
    path = tree / rel
    text = path.read_text()
    assert text.count(old) == 1, f"injection site not unique in {rel}: {old!r}"
    path.write_text(text.replace(old, new))
    out = tmp_path / "build"
    shutil.copytree(build_emu.BUILD / flavour, out, ignore=shutil.ignore_patterns("*.so", "*.tmp"))
    return build_emu.build(flavour, csrc=tree, out=out)


def _line_of(rel: str, needle: str) -> int:
    for i, line in enumerate((CSRC / rel).read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {rel}")


def _diagnoses(lib: Path, case=None, num_ranks: int = 2, env=None):
    case = case or CASES[0]
    results = run_ranks(_bug_worker, num_ranks, 77, case, timeout_s=120,
                        env={**EMU_ENV, "DEEP_EP_CORE_LIB": str(lib), **(env or {})})
    return results


def _sanitizer_failure(lib: Path, flavour: str, logs: Path, capfd, case=None) -> str:
    """Runs a case on 2 ranks with a sanitizer flavour that must abort: the ranks' reports (log files,
    and their stderr, where UBSan writes)."""
    env = emulated.sanitizer_env(flavour)
    for key in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS"):
        if key in env:
            env[key] += f":log_path={logs / 'report'}"
    with pytest.raises(AssertionError) as info:
        _diagnoses(lib, case, env=env)
    reports = "".join(p.read_text() for p in sorted(logs.glob("report*")))
    return str(info.value) + "\n" + reports + capfd.readouterr().err


DISPATCH = "kernels/intranode_dispatch.cu"


def test_bug_partial_warp_collective(emu_lib, tmp_path):
    """Half a warp skips a __ballot_sync: the other half's next collective is a different call site."""
    site = "const unsigned mask = __ballot_sync(0xffffffffu, wanted);"
    lib = _with_bug(tmp_path, DISPATCH, site,
                    "const unsigned mask = lane < 16 ? __ballot_sync(0xffffffffu, wanted) : 0u;")
    line = _line_of(DISPATCH, site)
    for text in _diagnoses(lib):
        assert "divergent warp collective" in text, text
        assert f"intranode_dispatch.cu:{line}" in text and "__ballot_sync" in text, text


def test_bug_barrier_count_mismatch(emu_lib, tmp_path):
    """One warp of a team names another thread count at the team's named barrier."""
    site = "        ptx::bar_sync(dst + 1, team.num_warps * 32);\n        sent += chunk;"
    lib = _with_bug(tmp_path, DISPATCH, site,
                    "        ptx::bar_sync(dst + 1, (team.warp_in_team == 1 ? 2 : 1) * team.num_warps * 32);\n"
                    "        sent += chunk;")
    for text in _diagnoses(lib):
        assert "barrier 1 count mismatch" in text or "barrier 2 count mismatch" in text, text
        assert "intranode_dispatch.cu" in text, text


def test_bug_never_completing_barrier(emu_lib, tmp_path):
    """A named barrier waiting for one warp more than the team has: a deadlock report naming it."""
    site = "        ptx::bar_sync(dst + 1, team.num_warps * 32);\n        sent += chunk;"
    lib = _with_bug(tmp_path, DISPATCH, site,
                    "        ptx::bar_sync(dst + 1, team.num_warps * 32 + 32);\n        sent += chunk;")
    line = _line_of(DISPATCH, "ptx::bar_sync(dst + 1, team.num_warps * 32);")
    for text in _diagnoses(lib):
        assert "deadlock in kernel dispatch_kernel" in text, text
        assert f"bar.sync 1, 416 at csrc/kernels/intranode_dispatch.cu:{line}" in text, text


def test_bug_protocol_deadlock(emu_lib, tmp_path):
    """The receiver never frees ring slots: the sender's bounded wait reports and traps."""
    site = "if (team.warp_in_team == 0 && lane == 0) ptx::st_release_sys_global(head_ptr, tail);"
    lib = _with_bug(tmp_path, DISPATCH, site, "(void)head_ptr;")
    for text in _diagnoses(lib, env={"DEEP_EP_TIMEOUT_S": "3"}):
        # The sender waits for free slots, so its receivers wait for tokens: whichever bounded wait
        # expires first reports (kernel, role, rank, channel, peer) and traps; the error carries it.
        assert re.search(r"deep_ep timeout in intranode dispatch: dispatch (sender \(waiting for free slots\)|"
                         r"receiver \(waiting for tokens\)), rank \d, channel \d, peer \d", text), text
        assert "__trap() at csrc/kernels/utils.cuh" in text and "cudaErrorLaunchFailure" in text, text


def test_bug_missing_ring_wrap(emu_lib, tmp_path):
    """The ring slot index loses its `% num_slots`: with rings of 32 slots and up to 80 tokens per
    rank, the senders write past their ring into the next rings and regions. The kernels still
    complete (counts and flags live elsewhere), so the diagnosis is the bit-exact comparison: the
    receivers' rows or their metadata differ from the portable engine's, named field by field."""
    site = "return ring(channel, src) * num_slots + slot % num_slots;"
    lib = _with_bug(tmp_path, "kernels/buffer_layout.cuh", site, "return ring(channel, src) * num_slots + slot;")
    results = _diagnoses(lib, CASES[0], num_ranks=2)
    for text in results:  # every rank's receive rings wrap (seed 77: its rows and top-k ids differ)
        assert text.startswith("mismatch:") and re.search(r"\(seed 77\): recv_(x|topk_idx|src_idx):", text), text


def test_bug_wild_write_crash_names_the_thread(emu_lib, tmp_path, capfd):
    """A write far out of bounds (layout kernel): the plain build's crash report names the kernel,
    block and thread before the rank dies."""
    rel = "kernels/layout.cu"
    site = "args.is_token_in_rank[static_cast<int64_t>(t) * args.num_ranks + r] = hit;"
    lib = _with_bug(tmp_path, rel, site,
                    "args.is_token_in_rank[static_cast<int64_t>(t) * args.num_ranks + r + (int64_t(1) << 44)] = hit;")
    with pytest.raises(AssertionError) as info:
        _diagnoses(lib)
    assert "process exited with code -11" in str(info.value), str(info.value)
    err = capfd.readouterr().err
    assert re.search(r"deep_ep emulator: SIGSEGV at address 0x[0-9a-f]+ in kernel get_dispatch_layout_kernel "
                     r"\(launched at .*layout.cu:\d+\), block \(0,0,0\), thread \d+", err), err[-2000:]


def test_bug_out_of_bounds_write_changes_output(emu_lib, tmp_path):
    """notify writes its channel prefix one element too far: the plain build shows a wrong handle
    (the ASan flavour names the write; see test_asan_*)."""
    site = "args.channel_prefix_matrix[d * num_channels + c] = running;"
    lib = _with_bug(tmp_path, "kernels/intranode_notify.cu", site,
                    "args.channel_prefix_matrix[d * num_channels + c + 1] = running;")
    results = _diagnoses(lib)
    assert any(text for text in results), "an out-of-bounds write went unnoticed"


# ---------------------------------------------------------------------------- ASan + UBSan flavour
@pytest.fixture(scope="module")
def asan_lib() -> Path:
    return _build_or_skip("asan")


def test_asan_intranode_clean(asan_lib):
    """The intranode kernels (notify, dispatch, cached, combine, worst tokens, FP8) under ASan+UBSan."""
    _run_intranode(2, [CASES[0], CASES[1], CASES[3]], env=emulated.sanitizer_env("asan"), timeout_s=300)


def test_asan_internode_and_low_latency_clean(asan_lib):
    """The internode two-hop kernels (2 x 2 virtual nodes) and the LL kernels under ASan+UBSan."""
    env = {**EMU_ENV, **emulated.sanitizer_env("asan")}
    seed = make_seed()
    failures = run_ranks(internode_cases.internode_worker, 4, seed, [internode_cases.CASES[0]], False,
                         ranks_per_node=2, timeout_s=300, env=env)
    failures += run_ranks(ll_cases.ll_worker, 2, seed, "peer", [ll_cases.LL_CASES[i] for i in (1, 2, 4, 5)], False,
                          timeout_s=300, env=env)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:40])


def test_asan_bug_out_of_bounds_write(asan_lib, tmp_path, capfd):
    rel = "kernels/intranode_notify.cu"
    site = "args.channel_prefix_matrix[d * num_channels + c] = running;"
    lib = _with_bug(tmp_path, rel, site, "args.channel_prefix_matrix[d * num_channels + c + 1] = running;", "asan")
    text = _sanitizer_failure(lib, "asan", tmp_path, capfd)
    assert "AddressSanitizer: heap-buffer-overflow" in text, text[-3000:]
    assert f"intranode_notify.cu:{_line_of(rel, site)}" in text, text[-3000:]


def test_asan_bug_misaligned_vector_access(asan_lib, tmp_path, capfd):
    """Ring rows read 4 bytes off their 16-byte alignment: UBSan names the int4 load."""
    site = "warp_copy_ring_to_global(args.recv_x + row * row_int4, buf.x(own, channel, src, slot), row_int4, lane);"
    lib = _with_bug(tmp_path, DISPATCH, site,
                    "warp_copy_ring_to_global(args.recv_x + row * row_int4, reinterpret_cast<const int4*>("
                    "reinterpret_cast<const char*>(buf.x(own, channel, src, slot)) + 4), row_int4 - 1, lane);", "asan")
    text = _sanitizer_failure(lib, "asan", tmp_path, capfd)
    assert re.search(r"kernels/ptx.cuh:\d+:\d+: runtime error: .*misaligned address 0x[0-9a-f]+ for type "
                     r"'const struct int4', which requires 16 byte alignment", text), text[-3000:]


# -------------------------------------------------------------------------------- TSan flavour
# Small cases only (~0.8 MB of shadow per CUDA thread; every CUDA thread is a TSan fiber): 2 ranks x
# 2 channels. TSan sees races inside one process: a rank's ring to itself, and a block's shared memory.
TSAN_CASE = Case("tsan: 2 channels, ring of 4", tokens=(12, 9), hidden=64, num_topk=2, experts_per_rank=2,
                 config=(4, 2, 4), worst_extra=None)


@pytest.fixture(scope="module")
def tsan_lib() -> Path:
    return _build_or_skip("tsan")


def test_tsan_intranode_clean(tsan_lib):
    _run_intranode(2, [TSAN_CASE], env=emulated.sanitizer_env("tsan"), timeout_s=300)


def test_tsan_bug_missing_release_before_tail(tsan_lib, tmp_path, capfd):
    """The sender publishes the ring tail with a relaxed store: its slot writes race with the
    receiver's reads (seen on the rank's ring to itself)."""
    site = "if (team.warp_in_team == 0 && lane == 0) ptx::st_release_sys_global(remote_tail, sent);"
    lib = _with_bug(tmp_path, DISPATCH, site,
                    "if (team.warp_in_team == 0 && lane == 0) ptx::st_relaxed_sys_global(remote_tail, sent);", "tsan")
    text = _sanitizer_failure(lib, "tsan", tmp_path, capfd, TSAN_CASE)
    assert "WARNING: ThreadSanitizer: data race" in text, text[-3000:]
    assert re.search(r"(warp_copy_ring_to_global|receive_token|send_token|warp_copy_nc_to_global)", text), text[-3000:]


def test_tsan_bug_missing_syncthreads(tsan_lib, tmp_path, capfd):
    """notify's __syncthreads between the per-channel counts and their prefix sums is removed: the
    shared-memory table races between warps."""
    rel = "kernels/intranode_notify.cu"
    site = "    if (threadIdx.x == 0) s_max_recv = 0;\n    __syncthreads();\n"
    lib = _with_bug(tmp_path, rel, site, "    if (threadIdx.x == 0) s_max_recv = 0;\n", "tsan")
    text = _sanitizer_failure(lib, "tsan", tmp_path, capfd, TSAN_CASE)
    assert "WARNING: ThreadSanitizer: data race" in text, text[-3000:]
    assert "notify_dispatch_kernel" in text and "intranode_notify.cu" in text, text[-3000:]
