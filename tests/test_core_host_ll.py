"""CPU tests of the CUDA low-latency engine's host side (no GPU needed; nothing here runs a kernel).

* The LL buffer layout the kernels use (``deep_ep_ll_layout``, the same ``__host__ __device__`` code)
  equals `deep_ep.config.LowLatencyLayout`, and fits in `get_low_latency_rdma_size_hint`.
* The binding's ``deep_ep_ll_call`` (`deep_ep._core.LLCall`) has the library's size; workspace sizing; the signal word
  (epoch, count) packing and the epoch wrap; every launcher's argument checks (before any CUDA call).
* The kernels' quantisation math, run on the host through the same ``__host__ __device__`` functions:
  the FP8 cast (scales, round_scale, UE8M0 bytes) bit for bit against `deep_ep.quant`, LogFMT-10 to
  within one code (bit-identical here; device ``log2f``/``exp2f`` may differ from the host's by an ulp).
* NVSHMEM: the one environment-default function (forced vs default variables, what it logs, the QP-depth
  rule), the host library discovery (``NVSHMEM_DIR``, the wheel), loading ``libdeep_ep_nvshmem.so``
  (or a clear reason why not), and the build's NVSHMEM discovery.
* The LL engine choice (`probe_ll`) without a GPU: not usable, the same reason on every rank.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import make_seed, run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_core  # noqa: E402
from deep_ep import _core, _nvshmem  # noqa: E402
from deep_ep.config import LowLatencyLayout, get_low_latency_rdma_size_hint  # noqa: E402

LIB = _core.load()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"compiled core not built: {_core.load_error()}")


def _python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=120)


# ------------------------------------------------------------------------------------ layout

SHAPES = [(1, 128, 1), (8, 128, 2), (128, 7168, 256), (128, 7168, 288), (256, 4096, 64), (1024, 8192, 16),
          (33, 384, 12), (7, 640, 48), (512, 2560, 160)]


@needs_lib
@pytest.mark.parametrize("t_max,hidden,experts", SHAPES)
def test_ll_layout_matches_python(t_max, hidden, experts):
    out = LIB.ll_layout(num_max_tokens=t_max, hidden=hidden, num_experts=experts)
    lay = LowLatencyLayout(t_max, hidden, experts)
    want = [lay.signaling_offset(0), lay.signaling_offset(1), lay.send_offset(0), lay.send_offset(1),
            lay.recv_offset(0), lay.recv_offset(1), lay.total_bytes, lay.dispatch_msg_bytes, lay.combine_msg_bytes]
    assert out == want
    assert lay.total_bytes <= get_low_latency_rdma_size_hint(t_max, hidden, 8, experts)
    # every region and dispatch message is 16-byte aligned (int4 accesses); the combine message (the
    # zero-copy view's row, DeepEP's size) only 4-byte: the kernels handle it (receive slots use 2H)
    assert all(v % 16 == 0 for v in want[:6]) and want[7] % 16 == 0 and want[8] % 4 == 0
    assert (want[8] % 16 == 0) == (hidden % 512 == 0)
    # the receive area holds [E_local][R][T_max] dispatch messages and [E][T_max] combine messages, any R
    assert lay.recv_bytes >= experts * t_max * max(lay.dispatch_msg_bytes, lay.combine_msg_bytes)
    # the combine send area holds the zero-copy view [E_local][R*T_max][combine message]
    assert lay.send_bytes >= experts * t_max * lay.combine_msg_bytes


def _regions(lay: LowLatencyLayout):
    """(name, begin, size) of the six regions, in buffer order."""
    out = []
    for slot in (0, 1):
        out.append((f"signal{slot}", lay.signaling_offset(slot), lay.signaling_bytes))
    for slot in (0, 1):
        out.append((f"send{slot}", lay.send_offset(slot), lay.send_bytes))
    for slot in (0, 1):
        out.append((f"recv{slot}", lay.recv_offset(slot), lay.recv_bytes))
    return out


def _check_layout(t_max: int, hidden: int, experts: int, ranks: int) -> None:
    """Every offset the kernels address with 16-byte accesses is 16-byte aligned (regions 128), the
    regions do not overlap and hold what the kernels put there; C++ and Python agree."""
    lay = LowLatencyLayout(t_max, hidden, experts)
    out = LIB.ll_layout(t_max, hidden, experts)
    assert list(out) == [lay.signaling_offset(0), lay.signaling_offset(1), lay.send_offset(0), lay.send_offset(1),
                         lay.recv_offset(0), lay.recv_offset(1), lay.total_bytes, lay.dispatch_msg_bytes,
                         lay.combine_msg_bytes]
    shape = f"(T_max={t_max}, hidden={hidden}, experts={experts}, ranks={ranks})"
    regions = _regions(lay)
    end = 0
    for name, begin, size in regions:
        assert begin % 128 == 0 and size % 128 == 0, f"{shape}: {name} at {begin} (+{size}) is not 128-byte aligned"
        assert begin >= end, f"{shape}: {name} overlaps the region before it"
        end = begin + size
    assert end == lay.total_bytes
    num_local = experts // ranks
    # what the kernels put in each region, by rank: send = the cast tokens (T_max dispatch messages) or the
    # zero-copy view [E_loc][R*T_max][combine message]; recv = [E_loc][R][T_max] dispatch messages or
    # [E][T_max] combine rows 2H apart; signals = E_loc * R (dispatch) or E (combine) int32 words
    assert lay.send_bytes >= max(t_max * lay.dispatch_msg_bytes, num_local * ranks * t_max * lay.combine_msg_bytes)
    assert lay.recv_bytes >= num_local * ranks * t_max * max(lay.dispatch_msg_bytes, 2 * hidden)
    assert lay.signaling_bytes >= 4 * experts
    # every 16-byte access lands on a 16-byte boundary: dispatch messages, combine receive rows (2H apart)
    assert lay.dispatch_msg_bytes % 16 == 0 and (2 * hidden) % 16 == 0


@needs_lib
def test_ll_layout_issue_example_is_aligned():
    """hidden 640, 3 tokens, 6 experts: DeepEP's sizes put send_offset(1) at 8 mod 16."""
    _check_layout(3, 640, 6, 2)
    assert LowLatencyLayout(3, 640, 6).send_offset(1) % 128 == 0


@needs_lib
def test_ll_layout_randomized_alignment_and_no_overlap():
    import random
    rng = random.Random(make_seed())
    for _ in range(400):
        ranks = rng.choice([1, 2, 3, 4, 6, 8, 16, 32])
        experts = ranks * rng.randint(1, 12)
        _check_layout(rng.randint(1, 1024), 128 * rng.randint(1, 64), experts, ranks)


@needs_lib
def test_ll_layout_rejects_bad_arguments():
    with pytest.raises(_core.CoreError, match="deep_ep_ll_layout: .*bad arguments"):
        LIB.ll_layout(8, 100, 16)


@needs_lib
def test_ll_call_struct_and_workspace():
    assert LIB.ll_call_bytes() == _core.LLCall.size == 264
    small = LIB.ll_workspace_words(8, 16, 2)
    big = LIB.ll_workspace_words(1024, 1024, 8)
    assert small > 32 and big > small
    # per slot: counts E + positions T*16 + lists E*T + received counts E + ready words E/R, 32-word rounded
    t, e, r = 128, 256, 8
    per_slot = e + t * 16 + e * t + e + e // r
    assert LIB.ll_workspace_words(t, e, r) == 32 + 2 * ((per_slot + 31) // 32 * 32)
    assert LIB.ll_workspace_words(8, 15, 2) == -1  # experts not a multiple of ranks


@needs_lib
def test_signal_words_and_epochs():
    # (epoch << 11) | (count + 1): a zeroed word (epoch 0) never matches a live epoch (1 .. 2^20 - 1)
    assert LIB.ll_host_pack_signal(1, 0) == (1 << 11) | 1
    assert LIB.ll_host_pack_signal(5, 1024) == (5 << 11) | 1025
    assert LIB.ll_host_pack_signal((1 << 20) - 1, 1024) < 2 ** 31
    # counts above T_max (an over-full block, flagged by the receiver) still fit: up to 2046
    assert LIB.ll_host_pack_signal((1 << 20) - 1, 2046) == 2 ** 31 - 1
    assert LIB.ll_host_next_epoch(0) == 1
    assert LIB.ll_host_next_epoch(41) == 42
    assert LIB.ll_host_next_epoch((1 << 20) - 1) == 1  # wraps, skipping 0


# ---------------------------------------------------------------------------- NVSHMEM env

def test_env_defaults_single_host():
    env = {"NVSHMEM_QP_DEPTH": "2048", "NVSHMEM_DISABLE_P2P": "1"}
    changed = _nvshmem.apply_env_defaults(num_qps_per_rank=12, allow_nvlink=True, allow_mnnvl=False, single_host=True,
                                          num_rdma_bytes=1 << 20, env=env)
    assert env["NVSHMEM_DISABLE_P2P"] == "0" and changed["NVSHMEM_DISABLE_P2P"] == ("1", "0")  # forced
    assert env["NVSHMEM_QP_DEPTH"] == "2048" and "NVSHMEM_QP_DEPTH" not in changed           # user's kept
    assert env["NVSHMEM_IBGDA_NUM_RC_PER_PE"] == "12"
    assert env["NVSHMEM_DISABLE_MNNVL"] == "1"
    assert env["NVSHMEM_IB_ENABLE_IBGDA"] == "0" and env["NVSHMEM_REMOTE_TRANSPORT"] == "none"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["NVSHMEM_DISABLE_NCCL"] == "1"
    assert env["NVSHMEM_MAX_TEAMS"] == "7" and env["NVSHMEM_CUMEM_GRANULARITY"] == str(1 << 29)
    assert int(env["NVSHMEM_SYMMETRIC_SIZE"]) == 1 << 30
    # idempotent: a second call changes nothing
    assert _nvshmem.apply_env_defaults(12, True, False, True, 1 << 20, env=env) == {}


def test_env_defaults_single_host_without_p2p():
    """allow_nvlink_for_low_latency_mode=False on one host: traffic needs a NIC, DeepEP's defaults apply."""
    env = {}
    _nvshmem.apply_env_defaults(24, allow_nvlink=False, allow_mnnvl=False, single_host=True, num_rdma_bytes=1 << 20,
                                env=env)
    assert env["NVSHMEM_DISABLE_P2P"] == "1" and env["NVSHMEM_IB_ENABLE_IBGDA"] == "1"
    assert "NVSHMEM_REMOTE_TRANSPORT" not in env


def test_env_defaults_multi_node_and_flags(caplog):
    env = {}
    with caplog.at_level(logging.INFO, logger="deep_ep"):
        changed = _nvshmem.apply_env_defaults(num_qps_per_rank=24, allow_nvlink=False, allow_mnnvl=True,
                                              single_host=False, num_rdma_bytes=3 << 30, env=env)
    assert env["NVSHMEM_DISABLE_P2P"] == "1"                 # allow_nvlink_for_low_latency_mode=False
    assert "NVSHMEM_DISABLE_MNNVL" not in env                 # allow_mnnvl=True
    assert env["NVSHMEM_IB_ENABLE_IBGDA"] == "1"              # DeepEP's default across nodes
    assert "NVSHMEM_REMOTE_TRANSPORT" not in env
    assert env["NVSHMEM_QP_DEPTH"] == "1024"
    heap = int(env["NVSHMEM_SYMMETRIC_SIZE"])
    assert heap >= (3 << 30) and heap % (1 << 29) == 0
    assert set(changed) == set(env)
    assert "NVSHMEM_DISABLE_P2P='1'" in caplog.text and "NVSHMEM_IB_ENABLE_IBGDA='1'" in caplog.text


def test_env_defaults_is_the_only_writer():
    """deep_ep writes NVSHMEM_* variables in deep_ep/_nvshmem.py only."""
    for path in (ROOT / "deep_ep").rglob("*.py"):
        if path.name == "_nvshmem.py":
            continue
        text = path.read_text()
        assert "environ[\"NVSHMEM" not in text and "environ['NVSHMEM" not in text, path


def test_qp_depth_rule():
    _nvshmem.check_qp_depth(511, env={})                     # (511 + 1) * 2 = 1024 = the default
    with pytest.raises(ValueError, match="NVSHMEM_QP_DEPTH=1024.*at least .* 1026"):
        _nvshmem.check_qp_depth(512, env={})
    _nvshmem.check_qp_depth(1024, env={"NVSHMEM_QP_DEPTH": "2050"})
    assert _nvshmem.qp_depth({"NVSHMEM_QP_DEPTH": "bogus"}) == _nvshmem.DEFAULT_QP_DEPTH


# -------------------------------------------------------------------------- library discovery

def test_find_host_library_nvshmem_dir(tmp_path):
    (tmp_path / "lib").mkdir()
    path, where = _core.find_nvshmem_host_library({"NVSHMEM_DIR": str(tmp_path)})
    assert path is None and "NVSHMEM_DIR" in where
    (tmp_path / "lib" / "libnvshmem_host.so.3").write_bytes(b"")
    path, where = _core.find_nvshmem_host_library({"NVSHMEM_DIR": str(tmp_path)})
    assert path == tmp_path / "lib" / "libnvshmem_host.so.3" and str(tmp_path) in where


def test_find_host_library_wheel():
    path, where = _core.find_nvshmem_host_library({})
    wheel, _ = build_core.find_nvshmem()
    if wheel is None or os.environ.get("NVSHMEM_DIR"):
        pytest.skip("no nvidia-nvshmem wheel here")
    assert path is not None and path.name == "libnvshmem_host.so.3" and "wheel" in where


def test_nvshmem_library_missing_is_reported():
    code = ("from deep_ep import _core\n"
            "assert _core.load_nvshmem() is None\n"
            "err = _core.nvshmem_load_error()\n"
            "assert 'not built' in err, err\n"
            "assert _core.load() is not None or _core.load_error()\n"
            "print('OK')\n")
    proc = _python(code, {"DEEP_EP_NVSHMEM_LIB": "/nonexistent/libdeep_ep_nvshmem.so"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_nvshmem_host_library_missing_is_reported(tmp_path):
    if not _core.nvshmem_library_path().is_file():
        pytest.skip("libdeep_ep_nvshmem.so not built")
    code = ("from deep_ep import _core\n"
            "assert _core.load_nvshmem() is None\n"
            "print(_core.nvshmem_load_error())\n")
    proc = _python(code, {"NVSHMEM_DIR": str(tmp_path)})
    assert proc.returncode == 0 and "libnvshmem_host.so.3" in proc.stdout, proc.stdout + proc.stderr


def test_nvshmem_library_loads_when_built():
    """Loading it pulls libnvshmem_host.so.3 from the wheel; no GPU is needed to load or query it."""
    if not _core.nvshmem_library_path().is_file():
        pytest.skip("libdeep_ep_nvshmem.so not built (no NVSHMEM at build time)")
    code = ("from deep_ep import _core\n"
            "nv = _core.load_nvshmem()\n"
            "assert nv is not None, _core.nvshmem_load_error()\n"
            "assert nv.abi_version() == 1 and nv.uniqueid_bytes() > 0\n"
            "assert nv.call_bytes() == _core.LLCall.size and nv.internode_call_bytes() == _core.InternodeCall.size\n"
            "status, pe, n_pes = nv.info()\n"
            "assert (pe, n_pes) == (-1, -1)\n"
            "try:\n"
            "    nv.alloc(bytes=128)\n"
            "    raise SystemExit('alloc before init must fail')\n"
            "except _core.CoreError as exc:\n"
            "    assert 'deep_ep_nvshmem_alloc: ' in str(exc) and 'before deep_ep_nvshmem_init' in str(exc), exc\n"
            "assert 'before deep_ep_nvshmem_init' in nv.last_error()\n"
            "print('OK')\n")
    proc = _python(code, {})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_core_does_not_need_nvshmem():
    """libdeep_ep_core.so has no NVSHMEM dependency: it loads with NVSHMEM hidden."""
    if LIB is None:
        pytest.skip("core not built")
    out = subprocess.run(["readelf", "-d", str(_core.library_path())], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("readelf not available")
    assert "nvshmem" not in out.stdout
    if _core.nvshmem_library_path().is_file():
        nv = subprocess.run(["readelf", "-d", str(_core.nvshmem_library_path())], capture_output=True, text=True).stdout
        assert "libnvshmem_host.so.3" in nv and "RPATH" not in nv and "RUNPATH" not in nv


def test_build_finds_nvshmem_dir(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    monkeypatch.setenv("NVSHMEM_DIR", str(tmp_path))
    assert build_core.find_nvshmem()[0] is None
    (tmp_path / "include" / "nvshmem.h").write_text("")
    path, note = build_core.find_nvshmem()
    assert path == tmp_path and "NVSHMEM_DIR" in note


# ------------------------------------------------------------------------- engine choice, no GPU

def _probe_ll_worker(rank, num_ranks, group):
    from deep_ep._comm import Communicator
    from deep_ep.engines import cuda_ll

    comm = Communicator(group)
    result = cuda_ll.probe_ll(comm, 1 << 20, True)
    os.environ["DEEP_EP_LL_TRANSPORT"] = "bogus"
    try:
        cuda_ll.probe_ll(comm, 1 << 20, True)
        bad = "no error"
    except ValueError as exc:
        bad = str(exc)
    finally:
        os.environ.pop("DEEP_EP_LL_TRANSPORT", None)
    comm.close()
    return result[:3], bad


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_ll_engine_unavailable_without_gpu():
    results = run_ranks(_probe_ll_worker, 2, timeout_s=180)
    for (ok, reason, transport), bad in results:
        assert not ok and transport == ""
        assert reason.startswith("rank 0: ") and (("no CUDA device" in reason) or ("not built" in reason)), reason
        assert "DEEP_EP_LL_TRANSPORT" in bad
    assert results[0][0] == results[1][0]


# --------------------------------------------------------------------------- call checks (no launch)

def _valid_call():
    c = _core.LLCall()
    c.kind, c.rank, c.num_ranks, c.slot = _core.LL_DISPATCH, 0, 2, 0
    c.num_tokens, c.num_max_tokens, c.hidden, c.num_experts, c.num_topk = 4, 8, 128, 4, 2
    lay = LowLatencyLayout(8, 128, 4)
    c.dispatch_msg_bytes, c.combine_msg_bytes = lay.dispatch_msg_bytes, lay.combine_msg_bytes
    c.buffer = c.workspace = c.mask = c.host_flags = 16  # never dereferenced: the checks fail first
    return c


@needs_lib
@pytest.mark.parametrize("field,value,message", [
    ("kind", 0, "bad call kind 0"),
    ("num_ranks", 1025, "num_ranks must be in [1, 1024], got 1025"),
    ("num_experts", 5, "num_experts must be a positive multiple of the number of ranks, got 5"),
    ("num_max_tokens", 1025, "num_max_dispatch_tokens_per_rank must be in [1, 1024], got 1025"),
    ("num_tokens", 9, "num_tokens 9 exceeds num_max_dispatch_tokens_per_rank"),
    ("hidden", 100, "hidden must be a positive multiple of 128, got 100"),
    ("num_topk", 17, "num_topk must be in [1, 16], got 17"),
    ("use_ue8m0", 1, "use_ue8m0 needs round_scale"),
    ("workspace", None, "null buffer/workspace/mask/flags"),
    ("dispatch_msg_bytes", 32, "message sizes do not match the layout"),
    ("device", -1, "bad device -1"),
])
def test_ll_call_checks_name_the_value(field, value, message):
    """Every launcher checks the call before launching (these fail without a GPU, before any CUDA call)."""
    c = _valid_call()
    setattr(c, field, value)
    for fn in (LIB.ll_prepare, LIB.ll_receive):
        with pytest.raises(_core.CoreError) as info:
            fn(call=c, stream=0)
        assert message in str(info.value), str(info.value)


@needs_lib
@pytest.mark.parametrize("entry", ["ll_prepare", "ll_receive"])
def test_ll_entry_points_make_the_call_device_current(entry):
    """Every LL entry point makes `call.device` current before launching, as the intranode ones do (the
    core links the CUDA runtime statically: its current device is not torch's). Here, without a GPU,
    that first CUDA call is what fails."""
    c = _valid_call()
    c.device = 0
    with pytest.raises(_core.CoreError, match="cudaSetDevice"):
        getattr(LIB, entry)(call=c, stream=0)


@needs_lib
def test_ll_peer_send_needs_a_runtime():
    c = _valid_call()
    with pytest.raises(_core.CoreError, match="deep_ep_ll_peer_send: .*null runtime"):
        LIB.ll_peer_send(None, c, 0)


# ------------------------------------------------------------- the kernels' quantisation math, on the host

def _bf16_rows(num_rows: int, hidden: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=gen) * torch.pow(2.0, torch.randint(-20, 20, (num_rows, 1), generator=gen).float())
    x[0, :128] = 0.0                      # an all-zero block (amax floor / all-zero LogFMT group)
    x[1, 5] = -0.0
    x[2, :128] = torch.linspace(-1, 1, 128)
    x[3, :64] *= 2.0 ** 18                 # a wide block: LogFMT falls back to BF16
    return x.to(torch.bfloat16).contiguous()


def _host_fp8(x: torch.Tensor, round_scale: bool):
    out = torch.empty(x.shape, dtype=torch.uint8)
    scales = torch.empty(x.size(0), x.size(1) // 128, dtype=torch.float32)
    LIB.ll_host_fp8_cast(x.view(torch.int16).data_ptr(), x.numel(), round_scale, out.data_ptr(), scales.data_ptr())
    return out, scales


@needs_lib
@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_cast_math_matches_quant(round_scale):
    """The cast kernel's scalar functions (fp8_scale_inv, fp8_quantize) equal deep_ep.quant bit for bit."""
    from deep_ep.quant import pack_ue8m0, per_token_cast_to_fp8
    x = _bf16_rows(64, 640, seed=3)
    got, got_scales = _host_fp8(x, round_scale)
    want, want_scales = per_token_cast_to_fp8(x, round_scale)
    assert torch.equal(got, want.view(torch.uint8))
    assert torch.equal(got_scales.view(torch.int32), want_scales.view(torch.int32))
    if round_scale:  # the UE8M0 bytes the receive kernel packs: (bits >> 23) & 0xff, block 4q in the low byte
        words = torch.zeros(64, (640 // 128 + 3) // 4, dtype=torch.int64)
        exp_bytes = (got_scales.view(torch.int32).to(torch.int64) >> 23) & 0xFF
        for g in range(640 // 128):
            words[:, g // 4] |= exp_bytes[:, g] << (8 * (g % 4))
        words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        assert torch.equal(words, pack_ue8m0(want_scales))


@needs_lib
def test_logfmt10_math_matches_quant():
    """The combine send's LogFMT-10 rounding (logfmt10_group / logfmt10_element) against deep_ep.quant:
    groups fall back / stay zero identically; values agree to one code (log2 may differ by an ulp)."""
    from deep_ep.quant import logfmt10_round
    x = _bf16_rows(48, 512, seed=5)
    got = torch.empty_like(x)
    LIB.ll_host_logfmt10_round(x=x.view(torch.int16).data_ptr(), n=x.numel(), out=got.view(torch.int16).data_ptr())
    want = logfmt10_round(x)
    assert torch.equal(got[3, :128], x[3, :128]) and torch.equal(want[3, :128], x[3, :128])  # fallback group
    assert torch.equal(got[0, :128].view(torch.int16), x[0, :128].view(torch.int16))        # all zero, signs kept
    same_sign = torch.equal(torch.signbit(got), torch.signbit(want))
    ratio = (got.float() / want.float()).nan_to_num(nan=1.0)
    one_code = 2.0 ** (1.0 / 32.0)  # the largest step of an encoded group, in log2 units
    assert same_sign and bool(((ratio <= one_code * 1.01) & (ratio >= 1 / (one_code * 1.01))).all())
    exact = float((got.view(torch.int16) == want.view(torch.int16)).float().mean())
    assert exact > 0.95, f"only {exact:.3f} of the values are bit-identical"
