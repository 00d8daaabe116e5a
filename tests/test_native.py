"""The native CPU helpers (deep_ep/_native.py, deep_ep/native/cpu_kernels.c) against the torch
operations they replace: the same bits on random and special values, bounds checks, and the switches."""

import os
import subprocess
import sys

import pytest
import torch

from deep_ep import _native
from dist_utils import make_seed

lib = _native.library()
needs_lib = pytest.mark.skipif(lib is None, reason=f"native helpers unavailable: {_native.status()}")


@needs_lib
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 2048), (torch.uint8, 7168), (torch.int32, 1),
                                         (torch.float32, 56)])
def test_copy_rows_matches_indexing(dtype, width):
    g = torch.Generator().manual_seed(make_seed())
    src_full = torch.randint(-100, 100, (40, width + 3), generator=g).to(dtype)
    src = src_full[:, 1:1 + width]                        # rows with a stride wider than the row
    dst = [torch.zeros(64, width, dtype=dtype) for _ in range(3)]
    n = 50
    src_index = torch.randint(0, 40, (n,), generator=g)
    dst_rank = torch.randint(0, 3, (n,), generator=g)
    dst_index = torch.randperm(64 * 3, generator=g)[:n] % 64
    # distinct (rank, row) targets, so that the expected result does not depend on the order
    key = dst_rank * 64 + dst_index
    keep = torch.unique(key, return_inverse=False, sorted=False).numel() == n
    if not keep:
        first = {}
        for i, k in enumerate(key.tolist()):
            first.setdefault(k, i)
        sel = torch.tensor(sorted(first.values()))
        src_index, dst_rank, dst_index = src_index[sel], dst_rank[sel], dst_index[sel]
    want = [d.clone() for d in dst]
    for r in range(3):
        m = dst_rank == r
        want[r][dst_index[m]] = src[src_index[m]]
    _native.copy_rows(lib, src, src_index, dst, dst_rank, dst_index)
    for r in range(3):
        assert torch.equal(dst[r], want[r])


@needs_lib
def test_copy_rows_refuses_out_of_range_indices_and_writes_nothing():
    src = torch.arange(20, dtype=torch.float32).view(10, 2)
    dst = [torch.zeros(4, 2)]
    for src_index, dst_index in (([0, 10], [0, 1]), ([0, 1], [0, 4]), ([-1, 0], [0, 1])):
        with pytest.raises(IndexError, match="out of range"):
            _native.copy_rows(lib, src, torch.tensor(src_index), dst, None, torch.tensor(dst_index))
        assert not dst[0].any()
    with pytest.raises(IndexError):
        _native.copy_rows(lib, src, torch.tensor([0]), dst, torch.tensor([1]), torch.tensor([0]))


def _torch_reduce(monkeypatch, *args):
    from deep_ep.engines.portable_ll import PortableLowLatency
    with monkeypatch.context() as m:
        m.setenv("DEEP_EP_CPU_NATIVE", "0")
        return PortableLowLatency._reduce(*args)


@needs_lib
@pytest.mark.parametrize("hidden", [128, 200, 7168])
def test_ll_reduce_native_matches_torch_on_special_values(hidden, monkeypatch):
    """NaN, infinities, signed zeros, subnormals and large magnitudes, negative and zero weights, missing
    pairs and a token without any: the native reduce gives torch's bits."""
    from deep_ep.engines.portable_ll import PortableLowLatency
    g = torch.Generator().manual_seed(make_seed())
    num_tokens, num_topk = 37, 6
    valid = torch.rand(num_tokens, num_topk, generator=g) >= 0.25
    valid[5] = False
    tok, kk = valid.nonzero(as_tuple=True)
    perm = torch.randperm(tok.numel(), generator=g)
    tok, kk = tok[perm], kk[perm]
    y = torch.randn(tok.numel(), hidden, generator=g) * torch.logspace(-38, 38, hidden)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 3e38])
    mask = torch.rand(y.shape, generator=g) < 0.05
    y[mask] = special[torch.randint(0, special.numel(), (int(mask.sum()),), generator=g)]
    recv = y.to(torch.bfloat16)
    weights = torch.randn(num_tokens, num_topk, generator=g)
    weights[0, :] = -0.0
    weights[1, :] = 0.0
    row = torch.arange(tok.numel())
    want = _torch_reduce(monkeypatch, recv, tok, kk, row, weights, num_tokens, num_topk, hidden)
    out = torch.full((num_tokens, hidden + 8), 7.0, dtype=torch.bfloat16)[:, 4:4 + hidden]  # strided rows
    got = PortableLowLatency._reduce(recv, tok, kk, row, weights, num_tokens, num_topk, hidden, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(got[5].view(torch.int16), torch.zeros(hidden, dtype=torch.int16))


@needs_lib
def test_ll_reduce_refuses_a_row_out_of_range():
    recv = torch.ones(4, 128, dtype=torch.bfloat16)
    out = torch.zeros(2, 128, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="out of range"):
        _native.ll_reduce_bf16(lib, recv, torch.tensor([[0, 4], [1, -1]]), torch.ones(2, 2), out)
    assert not out.float().any()


def _status_in_subprocess(env):
    code = "from deep_ep import _native; print(_native.status()); print(_native.library() is not None)"
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_switches(tmp_path):
    off = _status_in_subprocess({"DEEP_EP_CPU_NATIVE": "0"})
    assert off.returncode == 0 and off.stdout.split("\n")[:2] == ["torch operations (DEEP_EP_CPU_NATIVE=0)", "False"]
    # No compiler: the automatic mode falls back and says why; DEEP_EP_CPU_NATIVE=1 makes it an error.
    nocc = {"CC": str(tmp_path / "no-such-cc"), "PATH": str(tmp_path), "DEEP_EP_CACHE_DIR": str(tmp_path / "c"),
            "XDG_CACHE_HOME": str(tmp_path / "x"), "TMPDIR": str(tmp_path), "DEEP_EP_CPU_NATIVE": "auto"}
    auto = _status_in_subprocess(nocc)
    assert auto.returncode == 0, auto.stderr
    assert "torch operations (native helpers unavailable: no C compiler found" in auto.stdout
    required = _status_in_subprocess(dict(nocc, DEEP_EP_CPU_NATIVE="1"))
    assert required.returncode != 0 and "DEEP_EP_CPU_NATIVE=1, but the native CPU helpers are unavailable" in \
        required.stderr


@needs_lib
def test_ranks_that_start_at_once_compile_once(tmp_path):
    """A job's ranks starting together on a fresh cache: one compiler run, every rank loads its result."""
    real_cc = _native._compiler()
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc-wrapper"
    # The wrapper records each run and holds it open for a while, so unserialised builds would overlap.
    wrapper.write_text(f"#!/bin/sh\necho run >> '{log}'\nsleep 2\nexec '{real_cc}' \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, CC=str(wrapper), DEEP_EP_CACHE_DIR=str(tmp_path / "cache"), DEEP_EP_CPU_NATIVE="1")
    code = "from deep_ep import _native; print(_native.status())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.startswith("native (cc-wrapper, "), out
    assert log.read_text().split() == ["run"], "each rank ran the compiler: the build is not serialised"
    assert len(list((tmp_path / "cache").glob("cpu_kernels-*.so"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


@needs_lib
def test_build_goes_to_the_cache_dir(tmp_path):
    res = _status_in_subprocess({"DEEP_EP_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    built = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and str(built[0]) in res.stdout
    assert not list(tmp_path.glob("*.tmp"))


@needs_lib
def test_reduce_segments_refuses_bad_tokens_and_writes_nothing():
    rows = torch.ones(3, 128, dtype=torch.bfloat16)
    for tokens in ([0, 2, 2], [0, 5, 1], [-1, 0, 1], [0, 1, 4]):
        out = torch.zeros(4, 128, dtype=torch.bfloat16)
        with pytest.raises(IndexError, match="out of range or not ascending"):
            _native.reduce_segments_bf16(lib, [rows], torch.tensor(tokens), [0, 3], 4, [], out)
        assert not out.float().any()


@needs_lib
def test_ll_dispatch_place_refuses_bad_experts_and_overflow():
    """An expert id >= E, or more rows for an expert than its block holds from `begin` on: an error, and
    nothing written (the engine's own checks come first; this guards the C code)."""
    x = torch.ones(3, 16, dtype=torch.bfloat16)
    rows = [torch.zeros(2 * 4, 16, dtype=torch.bfloat16)]
    infos = [torch.full((2 * 4,), -5, dtype=torch.int32)]
    for topk, begin in (([[0, 2], [1, -1], [0, 1]], [0, 0]), ([[0, 1], [0, -1], [0, 1]], [2, 0]),
                        ([[0, 1], [1, -1], [0, 1]], [-1, 0])):
        with pytest.raises(IndexError, match="out of range"):
            _native.ll_dispatch_place(lib, torch.tensor(topk), 2, 2, 4, torch.tensor(begin), x, None, rows, infos,
                                      None)
        assert not rows[0].float().any() and bool((infos[0] == -5).all())
    # In range: rows land in (token, k) order after `begin`, the token index beside each.
    _native.ll_dispatch_place(lib, torch.tensor([[1, 0], [1, -1], [0, 1]]), 2, 2, 4, torch.tensor([1, 0]),
                              torch.arange(3, dtype=torch.bfloat16).view(3, 1).expand(3, 16).contiguous(), None,
                              rows, infos, None)
    assert infos[0].tolist() == [-5, 0, 2, -5, 0, 1, 2, -5]
    assert rows[0][:, 0].tolist() == [0, 0, 2, 0, 0, 1, 2, 0]


@needs_lib
def test_ll_combine_row_of_and_push_match_torch():
    """The combine's arrival order (pairs sorted by expert, stable) and its block walk, against torch."""
    g = torch.Generator().manual_seed(make_seed())
    num_ranks, num_local, num_tokens, num_topk, num_rows = 3, 4, 9, 5, 16
    num_experts = num_ranks * num_local
    topk = torch.randint(0, num_experts, (num_tokens, num_topk), generator=g)
    topk[torch.rand(topk.shape, generator=g) < 0.3] = -1
    topk[2, 1] = topk[2, 3] = 7 if int(topk[2, 0]) != 7 else 6     # a duplicate expert in one row
    row_of, per_owner = _native.ll_combine_row_of(lib, topk, num_experts, num_local, num_ranks)
    token, k = (topk >= 0).nonzero(as_tuple=True)
    order = torch.sort(topk[token, k], stable=True).indices
    want = torch.full(topk.shape, -1, dtype=torch.int64)
    want[token[order], k[order]] = torch.arange(order.numel())
    assert torch.equal(row_of, want)
    assert per_owner == torch.bincount(topk[topk >= 0] // num_local, minlength=num_ranks).tolist()
    with pytest.raises(IndexError):
        _native.ll_combine_row_of(lib, torch.tensor([[num_experts]]), num_experts, num_local, num_ranks)

    counts = torch.randint(0, 5, (num_local, num_ranks), generator=g)
    begins = torch.randint(0, num_rows - 5, (num_local, num_ranks), generator=g)
    ranges = (begins << 32) | counts
    src = torch.randn(num_local * num_rows, 8, generator=g).to(torch.bfloat16)
    slots = [torch.zeros(40, 8, dtype=torch.bfloat16) for _ in range(num_ranks)]
    offsets = [3, 0, 7]
    _native.ll_combine_push(lib, ranges, num_rows, offsets, src, slots)
    for s in range(num_ranks):
        rows = torch.cat([torch.arange(int(begins[j, s]), int(begins[j, s] + counts[j, s])) + j * num_rows
                          for j in range(num_local)])
        n = rows.numel()
        assert torch.equal(slots[s][offsets[s]:offsets[s] + n], src[rows])
        assert not slots[s][:offsets[s]].float().any() and not slots[s][offsets[s] + n:].float().any()
    with pytest.raises(IndexError):  # owner 0's rows would end one row past its slot
        _native.ll_combine_push(lib, ranges, num_rows, [41 - int(counts[:, 0].sum()), 0, 0], src, slots)


_SANITIZED = ["tests/test_native.py", "tests/test_cpu_kernels.py", "tests/test_low_latency.py"]


def test_native_helpers_under_asan_and_ubsan(tmp_path):
    """The helpers' tests and the 2-rank low-latency suite (push path: placement, combine walk and reduce)
    with the helpers built under AddressSanitizer + UndefinedBehaviorSanitizer, halting on the first report."""
    import shutil
    cc = shutil.which(os.environ.get("CC") or "gcc") or shutil.which("gcc")
    if lib is None or cc is None:
        pytest.skip("native helpers or gcc unavailable")
    asan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not asan or not os.path.isabs(asan) or not os.path.exists(asan):
        pytest.skip("libasan.so not found")
    env = dict(os.environ, DEEP_EP_CACHE_DIR=str(tmp_path), DEEP_EP_CPU_NATIVE="1", LD_PRELOAD=asan,
               DEEP_EP_NATIVE_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer "
                                     "-fno-sanitize-recover=all -O1",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               DEEP_EP_SANITIZED_RUN="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *_SANITIZED, "-k",
                          "not under_asan and (not test_low_latency or 2-bad_inputs)"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    text = run.stdout + run.stderr
    report = max(text.find("ERROR: AddressSanitizer"), text.find("runtime error:"))
    assert run.returncode == 0, text[report:report + 3000] if report >= 0 else text[-4000:]
    assert "passed" in run.stdout and " failed" not in run.stdout
    assert any(p.name.startswith("cpu_kernels-") for p in tmp_path.iterdir())  # built with the sanitizers


@needs_lib
def test_ll_dispatch_unpack_matches_torch(monkeypatch):
    """The push dispatch's receive-side bookkeeping (recv_count, layout_range, src_info): the C helper
    against the torch operations it replaces, on random blocks (a source that sends nothing, an expert
    that receives nothing); and a block past the expert's rows is refused with nothing written."""
    import types

    from deep_ep.engines import portable_ll
    g = torch.Generator().manual_seed(make_seed())
    num_ranks, num_local, t_max = 3, 4, 6
    num_experts, num_rows = num_ranks * num_local, num_ranks * t_max
    counts = torch.randint(0, t_max + 1, (num_ranks, num_experts), generator=g)
    counts[1] = 0
    counts[:, 2] = 0
    begins = torch.cumsum(counts, dim=0) - counts
    info = torch.randint(0, 1000, (num_local * num_rows,), dtype=torch.int32, generator=g)
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(portable_ll._native, "library", lambda: None)
        for rank in range(num_ranks):
            engine = types.SimpleNamespace(comm=types.SimpleNamespace(rank=rank))
            recv_count = torch.zeros(num_local, dtype=torch.int32)
            src_info = torch.full((num_local, num_rows), -1, dtype=torch.int32)
            layout_range = torch.zeros((num_local, num_ranks), dtype=torch.int64)
            portable_ll.PortableLowLatency._unpack_dispatch_push(engine, counts, begins, info, None, False, None,
                                                                 recv_count, src_info, layout_range)
            results.append((recv_count, src_info, layout_range))
    for a, b in zip(results[:num_ranks], results[num_ranks:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    bad = counts.clone()
    bad[0, 0] = num_rows + 1
    out = torch.full((num_local, num_rows), -7, dtype=torch.int32)
    with pytest.raises(IndexError):
        _native.ll_dispatch_unpack(lib, bad, begins, 0, info, torch.zeros(num_local, dtype=torch.int32),
                                   torch.zeros((num_local, num_ranks), dtype=torch.int64), out)
    assert (out == -7).all()


@needs_lib
@pytest.mark.parametrize("num_tokens,num_channels", [(37, 5), (8, 8), (1, 3), (0, 2), (100, 1)])
def test_dispatch_slots_matches_torch(num_tokens, num_channels, monkeypatch):
    """The handle's ring slots (send_head) from the C loop against the torch operations (channels of
    unequal length, more channels than tokens, no tokens)."""
    from deep_ep.engines import portable
    g = torch.Generator().manual_seed(make_seed())
    mask = torch.rand(num_tokens, 5, generator=g) < 0.4
    native = portable._slots(mask, num_channels)
    monkeypatch.setattr(portable._native, "library", lambda: None)
    want = portable._slots(mask, num_channels)
    assert native.dtype == want.dtype == torch.int32 and torch.equal(native, want)
    assert torch.equal(portable._slots(mask.t().contiguous().t(), num_channels), want)  # a transposed mask


@needs_lib
def test_dispatch_local_topk_matches_torch():
    """Received top-k ids made local and their weights: the C loop against the torch formula, ids at
    the range's edges and -1, weights NaN / -0.0 / inf kept bit for bit, rows with a column stride."""
    g = torch.Generator().manual_seed(make_seed())
    n, k, lo, num_local = 50, 6, 8, 4
    ids = torch.randint(-1, 20, (n, k), dtype=torch.int32, generator=g)
    ids[0] = torch.tensor([lo - 1, lo, lo + num_local - 1, lo + num_local, -1, 0], dtype=torch.int32)
    w = torch.randn(n, k, generator=g)
    w[0] = torch.tensor([float("nan"), -0.0, float("inf"), 1.5, float("-inf"), 2.0])
    w[1] = -0.0
    meta = torch.cat([torch.randint(0, 256, (n, 3), dtype=torch.uint8, generator=g),
                      ids.view(torch.uint8).view(n, 4 * k), w.view(torch.uint8).view(n, 4 * k)], dim=1)
    local, weights = _native.dispatch_local_topk(lib, meta, 3, 3 + 4 * k, k, lo, num_local)
    gidx = ids.to(torch.int64)
    is_local = (gidx >= 0) & (gidx - lo >= 0) & (gidx - lo < num_local)
    assert torch.equal(local, torch.where(is_local, gidx - lo, torch.full_like(gidx, -1)))
    want_w = torch.where(is_local, w, torch.zeros_like(w))
    assert torch.equal(weights.view(torch.int32), want_w.view(torch.int32))
    wide = torch.zeros(n, meta.size(1) + 5, dtype=torch.uint8)
    wide[:, :meta.size(1)] = meta
    again = _native.dispatch_local_topk(lib, wide[:, :meta.size(1)], 3, 3 + 4 * k, k, lo, num_local)
    assert torch.equal(again[0], local) and torch.equal(again[1].view(torch.int32), weights.view(torch.int32))


@needs_lib
@pytest.mark.parametrize("num_tokens,num_channels", [(37, 5), (8, 8), (1, 3), (100, 1)])
def test_dispatch_channel_counts_matches_torch(num_tokens, num_channels, monkeypatch):
    from deep_ep.engines import portable
    g = torch.Generator().manual_seed(make_seed())
    mask = torch.rand(num_tokens, 6, generator=g) < 0.5
    mask[:, 2] = False  # a destination that gets nothing
    native = portable._channel_counts(mask, num_channels)
    monkeypatch.setattr(portable._native, "library", lambda: None)
    want = portable._channel_counts(mask, num_channels)
    assert native.dtype == want.dtype == torch.int32 and torch.equal(native, want)


@needs_lib
def test_dispatch_row_runs_and_metadata_match_torch(monkeypatch):
    """The gloo dispatch's runs of consecutive rows (iovecs) and the metadata rows (scales, top-k ids
    and weights bit for bit, token index): the C loops against the torch operations."""
    from deep_ep.engines import portable
    g = torch.Generator().manual_seed(make_seed())
    num_tokens, num_dst, hidden = 60, 4, 1024  # 2 KiB rows: every destination gets iovecs, none is gathered
    mask = torch.rand(num_tokens, num_dst, generator=g) < 0.6
    mask[:, 1] = False
    mask[10:20, 3] = True  # one long run
    dst_ids, tok_ids = mask.t().nonzero(as_tuple=True)
    n_send = mask.sum(0).tolist()
    x = torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16)
    x_bytes = x.view(torch.uint8)
    staging = lambda nbytes, device: torch.empty(nbytes, dtype=torch.uint8)  # noqa: E731
    native = portable._row_runs(x_bytes, dst_ids, tok_ids, n_send, 0, staging)
    scales = torch.randn(num_tokens, 8, generator=g).t().contiguous().t()  # column-major, as FP8 scales come
    topk = torch.randint(-1, 32, (num_tokens, 5), generator=g)
    weights = torch.randn(num_tokens, 5, generator=g)
    weights[0, 0], weights[1, 1] = float("nan"), -0.0
    meta = _native.dispatch_pack_meta(lib, tok_ids, num_tokens, portable._bytes(scales), topk, weights)
    bare = _native.dispatch_pack_meta(lib, tok_ids, num_tokens, None, None, None)
    monkeypatch.setattr(portable._native, "library", lambda: None)
    want = portable._row_runs(x_bytes, dst_ids, tok_ids, n_send, 0, staging)
    assert native[0] is None and want[0] is None  # nothing gathered
    assert sorted(native[1]) == sorted(want[1]) and 1 not in native[1] and 0 not in native[1]
    for d in native[1]:
        assert native[1][d].dtype == torch.int64 and torch.equal(native[1][d], want[1][d])
        # the ranges are this destination's rows of x, in order
        flat = x_bytes.reshape(-1)
        got = b"".join(bytes(flat[o:o + n].tolist()) for b, o, n in native[1][d].tolist() if b == 0)
        assert got == bytes(x_bytes[tok_ids[dst_ids == d]].reshape(-1).tolist())
    src = torch.arange(num_tokens, dtype=torch.int32).view(-1, 1)
    table = torch.cat([portable._bytes(scales), portable._bytes(topk.to(torch.int32)), portable._bytes(weights),
                       portable._bytes(src)], dim=1)
    assert torch.equal(meta, table.index_select(0, tok_ids))
    assert torch.equal(bare, portable._bytes(src).index_select(0, tok_ids))
    with pytest.raises(IndexError):
        _native.dispatch_row_runs(lib, torch.tensor([0, 5]), torch.tensor([0, 1]), 4)
    with pytest.raises(IndexError):
        _native.dispatch_pack_meta(lib, torch.tensor([num_tokens]), num_tokens, None, topk, weights)


def _sock_exchange(fd, bases, sends, recvs, seq, state, hdr_in, err, timeout_ms=2000):
    """One call of the native helper with one peer (as deep_ep/_rowsock.py makes it)."""
    from array import array
    addr = lambda a: a.buffer_info()[0]  # noqa: E731
    fds = array("q", [fd])
    base_at = array("q", [b.data_ptr() for b in bases])
    base_bytes = array("q", [b.numel() for b in bases])
    sends = torch.tensor(sends, dtype=torch.int64).view(-1, 3)
    recvs = torch.tensor(recvs, dtype=torch.int64).view(-1, 3)
    sbeg, rbeg = array("q", [0, sends.size(0)]), array("q", [0, recvs.size(0)])
    return lib.sock_exchange(addr(fds), 1, addr(base_at), addr(base_bytes), len(bases), sends.data_ptr(), addr(sbeg),
                             recvs.data_ptr(), addr(rbeg), addr(seq), addr(state), addr(hdr_in), 0x44455052,
                             timeout_ms, addr(err))


@pytest.mark.skipif(lib is None or not getattr(lib, "HAVE_SOCK_EXCHANGE", 0), reason="no native sock_exchange")
def test_sock_exchange_moves_byte_ranges_and_resumes():
    """The row streams' C loop on a socket pair: the header and every range (over 1024 of them: several
    sendmsg/recvmsg calls, empty ranges skipped) arrive in order; a peer that reads nothing makes it
    return 'idle' and a second call resumes; a wrong header, a closed peer and a range outside its
    buffer are reported."""
    import socket
    import struct
    import threading
    from array import array
    g = torch.Generator().manual_seed(make_seed())
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        src = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g)   # 3 MiB: more than the socket holds
        dst = torch.zeros(5000, dtype=torch.uint8)
        # 1100 ranges of src (some empty), and the peer's 5000 bytes into dst in 1500 ranges
        lens = torch.randint(0, 2 << 10, (1100,), generator=g)
        lens[::7] = 0
        offs = torch.randint(0, (3 << 20) - (2 << 10), (1100,), generator=g)
        sends = [[0, int(o), int(n)] for o, n in zip(offs, lens)]
        cuts = sorted(torch.randperm(4999, generator=g)[:1499].add(1).tolist())
        bounds = [0] + cuts + [5000]
        recvs = [[1, lo, hi - lo] for lo, hi in zip(bounds[:-1], bounds[1:])]
        body = bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=g).tolist())
        b.sendall(struct.pack("<IIQ", 0x44455052, 7, 5000) + body)                  # the peer's message
        seq, state = array("q", [3, 7]), array("q", bytes(8 * 6))
        hdr_in, err = array("B", bytes(16)), array("q", [0] * 4)
        # nobody reads the other end: the send stalls, the call returns 1 (idle) with the receive done
        assert _sock_exchange(a.fileno(), [src, dst], sends, recvs, seq, state, hdr_in, err, timeout_ms=50) == 1
        assert bytes(dst.tolist()) == body and state[3] == 16
        total = int(lens.sum())
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_recv_all(b, 16 + total)))
        reader.start()
        assert _sock_exchange(a.fileno(), [src, dst], sends, recvs, seq, state, hdr_in, err) == 0
        reader.join()
        want = b"".join(bytes(src[o:o + n].tolist()) for _, o, n in sends)
        assert bytes(got[:16]) == struct.pack("<IIQ", 0x44455052, 3, total) and bytes(got[16:]) == want
        # a header that does not match (8 bytes announced, 5000 expected): stopped before the body
        b.sendall(struct.pack("<IIQ", 0x44455052, 7, 8) + b"x" * 8)
        state = array("q", bytes(8 * 6))
        assert _sock_exchange(a.fileno(), [src, dst], [], recvs, seq, state, hdr_in, err) == -1
        assert list(err) == [0, 4, 0, 5000] and state[4] == 0 and state[5] == 0
        # a range past the end of its buffer: refused before anything moves
        state = array("q", bytes(8 * 6))
        assert _sock_exchange(a.fileno(), [src, dst], [], [[1, 4990, 11]], seq, state, hdr_in, err) == -1
        assert err[1] == 6 and list(state) == [0] * 6
        # the peer closes its end for writing (after the 8 bytes left above: half a header)
        b.shutdown(socket.SHUT_WR)
        state = array("q", bytes(8 * 6))
        assert _sock_exchange(a.fileno(), [src, dst], [], recvs, seq, state, hdr_in, err) == -1
        assert list(err[:2]) == [0, 3] and state[3] == 8
    finally:
        a.close()
        b.close()


def _recv_all(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        assert chunk, "closed early"
        out += chunk
    return bytes(out)
