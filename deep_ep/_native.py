"""Native CPU helpers of the portable engine (`deep_ep/native/cpu_kernels.c`), compiled on first use.

A few loops of the CPU paths (the combines' reduces; row copies to computed places) cost
many small torch operations each; this module compiles one small C file with the machine's C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) and Python's headers into a CPython extension module in a
cache directory, imports it, and hands out thin wrappers (tensors go in as addresses and sizes). The results are bit for bit those of the torch operations the engines use without it
(``tests/test_native.py`` compares both on random and special values).

* ``DEEP_EP_CPU_NATIVE=0`` turns it off (the engines then use torch operations); ``=1`` makes a failed
  build an error instead of a silent fallback.
* The cache: ``DEEP_EP_CACHE_DIR``, else ``$XDG_CACHE_HOME/deep_ep``, else ``~/.cache/deep_ep``
  (a temporary directory when none is writable). The module's name carries a hash of the source,
  the compiler, its flags and the Python build; a build goes to a temporary name and is renamed into place, so ranks
  never see a half-written file, and it holds a lock file meanwhile, so ranks that start at once on a fresh
  cache wait for one compiler run instead of running one each.
* `status()` says what is used and why (`Buffer.engine_reason` shows it).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["library", "status", "copy_bytes", "copy_rows", "ll_combine_push", "ll_combine_row_of", "dispatch_channel_counts", "dispatch_local_topk", "dispatch_pack_meta", "dispatch_row_runs", "dispatch_slots", "ll_dispatch_place", "ll_dispatch_unpack", "ll_reduce_bf16", "reduce_segments_bf16"]

_SOURCE = Path(__file__).resolve().parent / "native" / "cpu_kernels.c"
_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
_lock = threading.Lock()
_state: dict = {}


def _env_mode() -> str:
    value = os.environ.get("DEEP_EP_CPU_NATIVE", "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "off"
    if value in ("1", "true", "on", "yes"):
        return "required"
    return "auto"


def _cache_dirs() -> List[Path]:
    dirs = []
    if os.environ.get("DEEP_EP_CACHE_DIR"):
        dirs.append(Path(os.environ["DEEP_EP_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(base) / "deep_ep")
    dirs.append(Path(tempfile.gettempdir()) / f"deep_ep-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    return dirs


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader("_cpu_kernels", str(path))
    spec = importlib.util.spec_from_file_location("_cpu_kernels", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class _BuildLock:
    """An exclusive ``flock`` on a file beside the module while it is built: the ranks of a job that
    start at once on a fresh cache wait for one compiler run instead of each running its own (dozens of
    processes compiling at once on a small machine can take longer than a collective's timeout). The
    kernel drops the lock when its holder dies; without ``fcntl`` (not POSIX) it does nothing."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> "_BuildLock":
        try:
            import fcntl
        except ImportError:
            return self
        self._fd = os.open(str(self._path), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = -1


def _compile(cc: str, flags: List[str], target: Path) -> str:
    """Compile the helpers to a temporary name beside `target` and rename it into place; "" on success,
    else what the compiler said."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            return f"{os.path.basename(cc)} failed: {(run.stderr or run.stdout).strip()[-400:]}"
        os.replace(tmp, target)
        return ""
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> Tuple[Optional[ModuleType], str]:
    if not _SOURCE.exists():
        return None, f"its source {_SOURCE} is missing"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        return None, f"Python's headers are missing (no Python.h in {include!r})"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    # DEEP_EP_NATIVE_CFLAGS: extra compiler flags (e.g. sanitizers, for the tests); part of the cache key.
    flags = _FLAGS + [f"-I{include}"] + os.environ.get("DEEP_EP_NATIVE_CFLAGS", "").split()
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc] + flags + [platform.machine(), sys.version, suffix])
                         .encode()).hexdigest()[:16]
    problems = []
    for folder in _cache_dirs():
        target = folder / f"cpu_kernels-{key}{suffix}"
        try:
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                with _BuildLock(folder / f".cpu_kernels-{key}.lock"):
                    if not target.exists():  # built by another process while this one waited
                        failed = _compile(cc, flags, target)
                        if failed:
                            return None, failed
            module = _load(target)
        except (OSError, ImportError, subprocess.SubprocessError) as exc:
            problems.append(f"{folder}: {exc}")
            continue
        return module, f"native ({os.path.basename(cc)}, {target})"
    return None, "no usable cache directory: " + "; ".join(problems)


def library() -> Optional[ModuleType]:
    """The loaded helpers, or None (off, or no compiler: `status` says why). Built once per process."""
    mode = _env_mode()
    if mode == "off":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _build()
    if _state["lib"] is None and mode == "required":
        raise RuntimeError(f"deep_ep: DEEP_EP_CPU_NATIVE=1, but the native CPU helpers are unavailable: {_state['why']}")
    return _state["lib"]


def status() -> str:
    """What the CPU paths use for their loops, for ``Buffer.engine_reason``."""
    if _env_mode() == "off":
        return "torch operations (DEEP_EP_CPU_NATIVE=0)"
    library()
    return _state["why"] if _state["lib"] is not None else f"torch operations (native helpers unavailable: {_state['why']})"


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# Copies at least this large go through `copy_bytes` in the shared-memory transport.
COPY_BYTES_MIN = 64 << 10


def copy_bytes(lib: ModuleType, dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for contiguous CPU tensors of the same size in bytes that do not overlap, with
    non-temporal stores for the bulk (see `deep_ep/native/cpu_kernels.c`, ``copy_nt``)."""
    n = dst.numel() * dst.element_size()
    assert dst.is_contiguous() and src.is_contiguous() and n == src.numel() * src.element_size()
    lo, hi = dst.data_ptr(), src.data_ptr()
    assert lo + n <= hi or hi + n <= lo or n == 0, "copy_bytes: the tensors overlap"
    lib.copy_bytes(lo, hi, n)


def copy_rows(lib: ModuleType, src: torch.Tensor, src_index: torch.Tensor, dst: Sequence[torch.Tensor],
              dst_rank: Optional[torch.Tensor], dst_index: torch.Tensor) -> None:
    """``dst[dst_rank[i]][dst_index[i]] = src[src_index[i]]`` for every i: rows of 2-D CPU tensors of one
    dtype and row width, each with contiguous rows (any row stride); indices int64 (contiguous)."""
    n = src_index.numel()
    if n == 0:
        return
    row_bytes = src.size(1) * src.element_size()
    assert src.stride(1) == 1 and all(d.stride(1) == 1 and d.size(1) == src.size(1) and d.dtype == src.dtype
                                      for d in dst), "copy_rows: rows must be contiguous and alike"
    assert len({d.stride(0) for d in dst}) == 1 and len({d.size(0) for d in dst}) == 1
    bases = torch.tensor([_ptr(d) for d in dst], dtype=torch.int64)
    src_index = src_index.to(torch.int64).contiguous()
    dst_index = dst_index.to(torch.int64).contiguous()
    rank = dst_rank.to(torch.int64).contiguous() if dst_rank is not None else None
    rc = lib.copy_rows(_ptr(src), src.stride(0) * src.element_size(), src.size(0), _ptr(src_index), _ptr(bases),
                       len(dst), _ptr(rank) if rank is not None else 0, dst[0].stride(0) * dst[0].element_size(),
                       dst[0].size(0), _ptr(dst_index), n, row_bytes)
    if rc != 0:
        raise IndexError("deep_ep: native copy_rows: an index is out of range (nothing was copied)")


def ll_reduce_bf16(lib: ModuleType, recv: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor,
                   out: torch.Tensor) -> None:
    """``out[t] = bf16(sum_k fp32(weights[t, k]) * fp32(recv[row_of[t, k]]))`` over ``k`` ascending with
    ``row_of >= 0`` (`deep_ep.engines.portable_ll.PortableLowLatency._reduce`'s definition)."""
    num_tokens, num_topk = row_of.shape
    hidden = out.size(1)
    assert recv.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and recv.size(1) == hidden
    assert recv.stride(1) == 1 and recv.stride(0) == hidden and out.stride(1) == 1
    row_of = row_of.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    acc = torch.empty(hidden, dtype=torch.float32)
    rc = lib.ll_reduce_bf16(_ptr(recv), recv.size(0), _ptr(row_of), _ptr(weights), num_tokens, num_topk, hidden,
                            _ptr(out), out.stride(0), _ptr(acc))
    if rc != 0:
        raise IndexError("deep_ep: native ll_reduce_bf16: a row index is out of range (nothing was written)")


def reduce_segments_bf16(lib: ModuleType, segs: Sequence[torch.Tensor], tok_ids: torch.Tensor, bounds: Sequence[int],
                         num_tokens: int, bias: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """``out[t] = bf16(bias_0[t] + ... + the rows of token t, segment by segment)`` in float32
    (`deep_ep.engines.portable.reduce_rows_by_token`'s definition): segment ``d`` is ``segs[d]`` (bf16
    ``[bounds[d+1] - bounds[d], H]``, contiguous rows) for the tokens ``tok_ids[bounds[d]:bounds[d+1]]``
    (strictly ascending)."""
    hidden = out.size(1)
    num_seg = len(segs)
    tok = tok_ids.to(torch.int64).contiguous()
    rows = [bounds[d + 1] - bounds[d] for d in range(num_seg)]
    for d, s in enumerate(segs):
        assert s.dtype == torch.bfloat16 and (rows[d] == 0 or (s.dim() == 2 and tuple(s.shape) == (rows[d], hidden)
                                                                 and s.stride(1) == 1)), "reduce: bad segment"
    for b in bias:
        assert b.dtype == torch.bfloat16 and tuple(b.shape) == (num_tokens, hidden) and b.stride(1) == 1
    assert out.dtype == torch.bfloat16 and out.stride(1) == 1
    seg_ptr = torch.tensor([_ptr(s) for s in segs], dtype=torch.int64)
    seg_stride = torch.tensor([s.stride(0) if rows[d] else hidden for d, s in enumerate(segs)], dtype=torch.int64)
    tok_ptr = torch.tensor([_ptr(tok) + bounds[d] * 8 for d in range(num_seg)], dtype=torch.int64)
    seg_rows = torch.tensor(rows, dtype=torch.int64)
    bias_ptr = torch.tensor([_ptr(b) for b in bias] or [0], dtype=torch.int64)
    bias_stride = torch.tensor([b.stride(0) for b in bias] or [0], dtype=torch.int64)
    acc = torch.empty(hidden, dtype=torch.float32)
    cursor = torch.empty(max(num_seg, 1), dtype=torch.int64)
    rc = lib.reduce_segments_bf16(_ptr(seg_ptr), _ptr(seg_stride), _ptr(tok_ptr), _ptr(seg_rows), num_seg,
                                  _ptr(bias_ptr), _ptr(bias_stride), len(bias), num_tokens, hidden, _ptr(out),
                                  out.stride(0), _ptr(acc), _ptr(cursor))
    if rc != 0:
        raise IndexError("deep_ep: native reduce_segments_bf16: a token index is out of range or not ascending "
                         "(nothing was written)")


def ll_dispatch_place(lib: ModuleType, topk_idx: torch.Tensor, num_experts: int, num_local: int, num_rows: int,
                      begin: torch.Tensor, x: torch.Tensor, scales: Optional[torch.Tensor],
                      rows: Sequence[torch.Tensor], infos: Sequence[torch.Tensor],
                      stages: Optional[Sequence[torch.Tensor]]) -> None:
    """The low-latency push dispatch's writes (`deep_ep/native/cpu_kernels.c`, ``ll_dispatch_place``):
    every valid (t, k) row-major, expert e's next row of rank e // L's block e % L from ``begin[e]`` on.
    `x`: ``[T, W]`` rows (contiguous rows); `rows[d]`: rank d's ``[L * num_rows, W]`` (same dtype),
    `infos[d]` its int32 ``[L * num_rows]``, `stages[d]` its ``[L * num_rows, S]`` (with `scales`
    ``[T, S]``)."""
    num_tokens, num_topk = topk_idx.shape
    topk = topk_idx.to(torch.int64).contiguous()
    begin = begin.to(torch.int64).contiguous()
    assert x.stride(-1) == 1 and all(r.dtype == x.dtype and r.size(-1) == x.size(-1) and r.is_contiguous()
                                     and r.numel() >= num_local * num_rows * x.size(-1) for r in rows)
    assert all(i.dtype == torch.int32 and i.numel() >= num_local * num_rows for i in infos)
    if scales is not None:
        assert stages is not None and scales.stride(-1) == 1 and all(
            st.dtype == scales.dtype and st.size(-1) == scales.size(-1) and st.is_contiguous() for st in stages)
    ptrs = torch.tensor([_ptr(r) for r in rows] + [_ptr(i) for i in infos]
                        + ([_ptr(st) for st in stages] if scales is not None else [0] * len(rows)), dtype=torch.int64)
    n = len(rows)
    cursor = torch.empty(max(num_experts, 1), dtype=torch.int64)
    rc = lib.ll_dispatch_place(_ptr(topk), num_tokens, num_topk, num_experts, num_local, num_rows, _ptr(begin),
                               _ptr(x), x.stride(0) * x.element_size(), x.size(1) * x.element_size(),
                               _ptr(scales) if scales is not None else 0,
                               scales.stride(0) * scales.element_size() if scales is not None else 0,
                               scales.size(1) * scales.element_size() if scales is not None else 0,
                               _ptr(ptrs), _ptr(ptrs) + 8 * n, _ptr(ptrs) + 16 * n, _ptr(cursor))
    if rc != 0:
        raise IndexError("deep_ep: native ll_dispatch_place: an expert id or a row position is out of range "
                         "(nothing was written)")


def dispatch_channel_counts(lib: ModuleType, mask: torch.Tensor, per: int, num_channels: int) -> torch.Tensor:
    """Per destination, the tokens of each channel (``per`` tokens each) set in `mask` (bool ``[T, D]``,
    ``T >= 1``): int32 ``[D, C]`` (``dispatch_channel_counts``)."""
    m = mask.contiguous()
    num_tokens, num_dst = m.shape
    counts = torch.empty((num_dst, num_channels), dtype=torch.int32)
    if lib.dispatch_channel_counts(_ptr(m), num_tokens, num_dst, per, num_channels, _ptr(counts)) != 0:
        raise ValueError(f"deep_ep: native dispatch_channel_counts: {num_tokens} tokens do not fit {num_channels} "
                         f"channels of {per}")
    return counts


def dispatch_row_runs(lib: ModuleType, dst_ids: torch.Tensor, tok_ids: torch.Tensor,
                      num_dst: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """The runs of consecutive tokens of the dispatch's (destination, token) pairs (sorted by destination,
    then token; ``dispatch_row_runs``): ``(first token of each run, its length (int64 tensors), runs per
    destination)``."""
    dst = dst_ids.to(torch.int64).contiguous()
    tok = tok_ids.to(torch.int64).contiguous()
    num = tok.numel()
    run_tok = torch.empty(max(num, 1), dtype=torch.int64)
    run_len = torch.empty(max(num, 1), dtype=torch.int64)
    per_dst = torch.empty(max(num_dst, 1), dtype=torch.int64)
    runs = lib.dispatch_row_runs(_ptr(dst), _ptr(tok), num, num_dst, _ptr(run_tok), _ptr(run_len), _ptr(per_dst))
    if runs < 0:
        raise IndexError("deep_ep: native dispatch_row_runs: a destination is out of range")
    return run_tok[:runs], run_len[:runs], per_dst[:num_dst].tolist()


def dispatch_pack_meta(lib: ModuleType, tok_ids: torch.Tensor, num_tokens: int, scales: Optional[torch.Tensor],
                       topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The dispatch's metadata rows (``dispatch_pack_meta``): for each token of `tok_ids`, the uint8 row
    ``[its scales' bytes (scales: uint8 [T, S] rows) | top-k ids as int32 | top-k weights (float32) |
    the token index as int32]``; ``[n, width]`` uint8."""
    tok = tok_ids.to(torch.int64).contiguous()
    n = tok.numel()
    scale_bytes = int(scales.size(1)) if scales is not None else 0
    if scales is not None:
        assert scales.dtype == torch.uint8 and scales.size(0) == num_tokens and (scales.stride(1) == 1 or scale_bytes <= 1)
    num_topk = int(topk_idx.size(1)) if topk_idx is not None else 0
    if topk_idx is not None:
        topk_idx = topk_idx.to(torch.int64).contiguous()
        topk_weights = topk_weights.to(torch.float32).contiguous()
        assert tuple(topk_weights.shape) == tuple(topk_idx.shape) and topk_idx.size(0) == num_tokens
    width = scale_bytes + 8 * num_topk + 4
    out = torch.empty((n, width), dtype=torch.uint8)
    if n:
        rc = lib.dispatch_pack_meta(_ptr(tok), n, num_tokens, _ptr(out), width,
                                    _ptr(scales) if scale_bytes else 0, scales.stride(0) if scale_bytes else 0,
                                    scale_bytes, _ptr(topk_idx) if num_topk else 0,
                                    _ptr(topk_weights) if num_topk else 0, num_topk)
        if rc != 0:
            raise IndexError("deep_ep: native dispatch_pack_meta: a token index is out of range")
    return out


def dispatch_slots(lib: ModuleType, mask: torch.Tensor, per: int) -> torch.Tensor:
    """The normal dispatch's ring slot of every (token, destination) (``deep_ep/native/cpu_kernels.c``,
    ``dispatch_slots``): earlier tokens of the same channel (``per`` tokens each) with the same
    destination, or -1 where `mask` (bool ``[T, D]``) is False. Returns int32 ``[T, D]``."""
    m = mask.contiguous()
    num_tokens, num_dst = m.shape
    out = torch.empty((num_tokens, num_dst), dtype=torch.int32)
    cnt = torch.empty(max(num_dst, 1), dtype=torch.int64)
    if num_tokens and num_dst:
        if lib.dispatch_slots(_ptr(m), num_tokens, num_dst, per, _ptr(out), _ptr(cnt)) != 0:
            raise ValueError(f"deep_ep: native dispatch_slots: tokens per channel must be positive, got {per}")
    return out


def dispatch_local_topk(lib: ModuleType, meta: torch.Tensor, idx_off: int, w_off: int, num_topk: int, lo: int,
                        num_local: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The normal dispatch's received top-k made local (``dispatch_local_topk``): `meta` uint8 ``[N, W]``
    rows (unit column stride) hold int32 global expert ids at byte `idx_off` and float32 weights at
    `w_off`; returns ``(int64 [N, K]: id - lo for ids in [lo, lo + num_local), else -1; float32 [N, K]:
    the weight there, else +0.0)``, the weights' bits unchanged."""
    num_rows = meta.size(0)
    assert meta.dtype == torch.uint8 and meta.dim() == 2 and (meta.stride(1) == 1 or meta.size(1) <= 1)
    assert 0 <= idx_off and idx_off + 4 * num_topk <= meta.size(1) and 0 <= w_off and w_off + 4 * num_topk <= meta.size(1)
    out_idx = torch.empty((num_rows, num_topk), dtype=torch.int64)
    out_w = torch.empty((num_rows, num_topk), dtype=torch.float32)
    if num_rows and num_topk:
        lib.dispatch_local_topk(_ptr(meta), meta.stride(0), idx_off, w_off, num_rows, num_topk, lo, num_local,
                                _ptr(out_idx), _ptr(out_w))
    return out_idx, out_w


def ll_dispatch_unpack(lib: ModuleType, counts: torch.Tensor, begins: torch.Tensor, rank: int, info: torch.Tensor,
                       recv_count: torch.Tensor, layout_range: torch.Tensor, src_info: torch.Tensor) -> None:
    """The low-latency push dispatch's receive-side bookkeeping (`deep_ep/native/cpu_kernels.c`,
    ``ll_dispatch_unpack``): from the header's ``counts``/``begins`` (``[R, E]``, pairs of each source
    per expert and where they start in the block) and this rank's `info` (int32 ``[L * num_rows]``), fill
    `recv_count` (int32 ``[L]``), `layout_range` (int64 ``[L, R]``, ``(begin << 32) | count``) and the
    first ``recv_count[j]`` entries of each row of `src_info` (int32 ``[L, num_rows]``)."""
    counts = counts.to(torch.int64).contiguous()
    begins = begins.to(torch.int64).contiguous()
    num_ranks, num_experts = counts.shape
    num_local, num_rows = src_info.shape
    assert begins.shape == counts.shape and info.dtype == torch.int32 and info.numel() >= num_local * num_rows
    assert info.is_contiguous() and src_info.is_contiguous() and src_info.dtype == torch.int32
    assert recv_count.is_contiguous() and recv_count.dtype == torch.int32 and recv_count.numel() == num_local
    assert layout_range.is_contiguous() and layout_range.dtype == torch.int64
    assert tuple(layout_range.shape) == (num_local, num_ranks)
    rc = lib.ll_dispatch_unpack(_ptr(counts), _ptr(begins), num_ranks, num_experts, num_local, rank, num_rows,
                                _ptr(info), _ptr(recv_count), _ptr(layout_range), _ptr(src_info))
    if rc != 0:
        raise IndexError("deep_ep: native ll_dispatch_unpack: a block runs past its expert's rows (nothing was "
                         "written)")


def ll_combine_row_of(lib: ModuleType, topk_idx: torch.Tensor, num_experts: int, num_local: int,
                      num_ranks: int) -> Tuple[torch.Tensor, List[int]]:
    """``(row_of [T, K] int64, pairs per owner rank)``: the low-latency combine's arrival row of every
    (token, k) (grouped by expert ascending, then (token, k) row-major; -1 where ``topk_idx`` is -1)."""
    topk = topk_idx.to(torch.int64).contiguous()
    row_of = torch.empty(topk.shape, dtype=torch.int64)
    per_owner = torch.empty(num_ranks, dtype=torch.int64)
    scratch = torch.empty(max(num_experts, 1), dtype=torch.int64)
    rc = lib.ll_combine_row_of(_ptr(topk), topk.size(0), topk.size(1), num_experts, num_local, num_ranks,
                               _ptr(row_of), _ptr(per_owner), _ptr(scratch))
    if rc != 0:
        raise IndexError("deep_ep: native ll_combine_row_of: an expert id is out of range")
    return row_of, per_owner.tolist()


def ll_combine_push(lib: ModuleType, layout_range: torch.Tensor, num_rows: int, offsets: Sequence[int],
                    src: torch.Tensor, slots: Sequence[torch.Tensor]) -> None:
    """The low-latency combine's push writes: for each owner s and local expert j ascending, the rows of
    block ``layout_range[j, s]`` of `src` (``[L * num_rows, H]``, contiguous rows) go to ``slots[s]`` (the
    owners' receive slots, ``[rows, H]`` alike) from row ``offsets[s]`` on."""
    ranges = layout_range.to(torch.int64).contiguous()
    num_local, num_ranks = ranges.shape
    assert src.stride(1) == 1 and len(slots) == num_ranks
    assert all(sl.dtype == src.dtype and sl.size(1) == src.size(1) and sl.is_contiguous() for sl in slots)
    assert len({sl.size(0) for sl in slots}) == 1 and src.size(0) >= num_local * num_rows
    offs = torch.tensor(list(offsets), dtype=torch.int64)
    bases = torch.tensor([_ptr(sl) for sl in slots], dtype=torch.int64)
    rc = lib.ll_combine_push(_ptr(ranges), num_local, num_ranks, num_rows, _ptr(offs), _ptr(src),
                             src.stride(0) * src.element_size(), src.size(1) * src.element_size(), _ptr(bases),
                             slots[0].size(0))
    if rc != 0:
        raise IndexError("deep_ep: native ll_combine_push: a block or a destination is out of range "
                         "(nothing was written)")
