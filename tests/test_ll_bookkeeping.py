"""CPU replays of the CUDA low-latency engine's cross-call bookkeeping (no GPU; nothing runs a kernel).

What runs for real: the engine's Python side (`CudaLowLatency._call`: layout, workspace allocation and
reuse, the layout-change reset, `clean_buffer`) on a CPU tensor standing in for the LL buffer and the
workspace, and the kernels' per-call workspace bookkeeping through the core's host replay entry points
(``deep_ep_ll_host_begin_slot`` / ``publish_counts`` / ``counts_published``: the very
``__host__ __device__`` functions the prepare and dispatch-receive kernels call). What is modelled: the
words the kernels and the peers write besides those (counts, token lists, positions: small integers;
signal words: ``pack_signal(epoch, count)`` at the layout's offsets), written here as the kernels would.

* The dispatch receive's helper blocks (parts > 0) must never find the "counts published" word already
  at the value they wait for before part 0 of the same call stored it (issue 12, item 1): across shape
  changes that reuse a larger workspace, `clean_low_latency_buffer` resetting the epochs, and epochs
  wrapping.
* A call whose layout moved the signalling areas (num_experts changed) must not find a word there that
  decodes as the epoch its receive waits for before any peer signalled (issue 12, item 3).
"""

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))

from deep_ep import _core  # noqa: E402
from deep_ep.config import LowLatencyLayout, get_low_latency_rdma_size_hint  # noqa: E402
from deep_ep.engines.cuda_ll import CudaLowLatency  # noqa: E402

LIB = _core.load()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"compiled core not built: {_core.load_error()}")
EPOCH_BITS_SHIFT = 11  # kCountBits: signal word = (epoch << 11) | (count + 1)


class _FakeComm:
    def __init__(self):
        self.barriers = []

    def barrier(self, op=""):
        self.barriers.append(op)


def _cpu_engine(num_ranks: int, num_rdma_bytes: int, rank: int = 0) -> CudaLowLatency:
    """A `CudaLowLatency` whose buffer, workspace and mask are CPU tensors (never handed to a kernel)."""
    eng = CudaLowLatency.__new__(CudaLowLatency)
    eng._lib = LIB
    eng.comm = _FakeComm()
    eng.rank, eng.num_ranks = rank, num_ranks
    eng.num_rdma_bytes = num_rdma_bytes
    eng.enable_shrink = False
    eng.transport = "peer"
    eng.device = torch.device("cpu")
    eng.emulated = True  # CPU tensors, no CUDA stream or capture to consult
    eng.timeout_s = 1.0
    eng.num_sms = 132
    eng._rt = eng._nv = None
    eng._nv_ptr = 0
    eng._init_slots()
    eng._workspace = None
    eng._workspace_key = None
    eng._signal_layout = None
    eng._mask = torch.zeros(num_ranks, dtype=torch.int32)
    eng._flags = torch.zeros(4, dtype=torch.int32)
    eng._buffer = torch.zeros(num_rdma_bytes, dtype=torch.uint8)
    eng._ptr = eng._buffer.data_ptr()
    return eng


def _begin(eng: CudaLowLatency, kind: int, t_max: int, hidden: int, num_experts: int):
    """The host side of one LL call, then what its prepare kernel does to the slot's workspace words."""
    slot, _ = eng._begin_call()
    c = eng._call(kind, slot, t_max, hidden, num_experts, num_tokens=1, num_topk=1)
    LIB.ll_host_begin_slot(c.workspace, c)
    return c, eng._workspace


def _scribble_slot(ws: torch.Tensor, c, rng: random.Random) -> None:
    """What the prepare / send / receive kernels leave in the slot's other words: counts, positions,
    token indices, received counts (small non-negative integers), the header (epochs) untouched."""
    per_slot = (LIB.ll_workspace_words(c.num_max_tokens, c.num_experts, c.num_ranks) - 32) // 2
    num_local = c.num_experts // c.num_ranks
    base = 32 + c.slot * per_slot
    words = c.num_experts + c.num_max_tokens * 16 + c.num_experts * c.num_max_tokens + c.num_experts
    vals = torch.tensor([rng.randrange(0, 2 * c.num_max_tokens + 4) for _ in range(words)], dtype=torch.int32)
    ws[base:base + words] = vals
    assert words + num_local <= per_slot


def _dispatch_receive(c, ws: torch.Tensor) -> None:
    """Part 0 of each local expert publishes; before that, no other block may start (the defect)."""
    num_local = c.num_experts // c.num_ranks
    for j in range(num_local):
        early = LIB.ll_host_counts_published(c.workspace, c, j)
        assert not early, (f"slot {c.slot}, epoch {int(ws[c.slot])}, local expert {j}: the receive's helper blocks "
                            f"would read counts and rows before the sources signalled (stale ready word)")
    for j in range(num_local):
        LIB.ll_host_publish_counts(c.workspace, c, j)
        assert LIB.ll_host_counts_published(c.workspace, c, j)


def _gpu_case_shapes(num_ranks: int):
    from ll_cases import LL_CASES
    return [(case.t_max, case.hidden, case.experts_per_rank * num_ranks) for case in LL_CASES]


@needs_lib
@pytest.mark.parametrize("seed", range(20))
def test_ready_word_never_stale_over_the_gpu_test_sequence(seed):
    """The GPU test's own sequence of shapes (tests/gpu/ll_cases.py, 2 ranks; one buffer, one workspace
    reused for smaller shapes), shuffled per seed, each case a dispatch and a combine, with
    clean_low_latency_buffer in between at random."""
    rng = random.Random(seed)
    num_ranks = 2
    shapes = _gpu_case_shapes(num_ranks)
    rng.shuffle(shapes)
    rdma = max(get_low_latency_rdma_size_hint(t, h, num_ranks, e) for t, h, e in shapes)
    eng = _cpu_engine(num_ranks, rdma)
    for t_max, hidden, experts in shapes * 2:
        c, ws = _begin(eng, _core.LL_DISPATCH, t_max, hidden, experts)
        _dispatch_receive(c, ws)
        _scribble_slot(ws, c, rng)
        c, ws = _begin(eng, _core.LL_COMBINE, t_max, hidden, experts)
        _scribble_slot(ws, c, rng)
        if rng.random() < 0.3:
            eng.clean_buffer(t_max, hidden, experts)


@needs_lib
def test_ready_word_never_stale_after_clean_low_latency_buffer():
    """The issue's loop: dispatch, two combines, clean_low_latency_buffer (epochs back to 0), repeated."""
    eng = _cpu_engine(2, get_low_latency_rdma_size_hint(128, 7168, 2, 8))
    for _ in range(6):
        c, ws = _begin(eng, _core.LL_DISPATCH, 128, 7168, 8)
        _dispatch_receive(c, ws)
        for _ in range(2):
            _begin(eng, _core.LL_COMBINE, 128, 7168, 8)
        eng.clean_buffer(128, 7168, 8)


@needs_lib
def test_ready_word_never_stale_across_the_epoch_wrap():
    eng = _cpu_engine(2, get_low_latency_rdma_size_hint(8, 128, 2, 4))
    c, ws = _begin(eng, _core.LL_DISPATCH, 8, 128, 4)
    _dispatch_receive(c, ws)
    ws[0] = (1 << 20) - 2  # slot 0 two calls before the wrap
    for _ in range(4):
        c, ws = _begin(eng, _core.LL_DISPATCH, 8, 128, 4)
        _dispatch_receive(c, ws)
        _begin(eng, _core.LL_COMBINE, 8, 128, 4)


# ----------------------------------------------------------------------------- signal areas (item 3)

def _signal_words(eng: CudaLowLatency, c) -> torch.Tensor:
    lay = LowLatencyLayout(c.num_max_tokens, c.hidden, c.num_experts)
    begin = lay.signaling_offset(c.slot)
    return eng._buffer[begin:begin + lay.signaling_bytes].view(torch.int32)


def _peers_signal(eng: CudaLowLatency, c, ws: torch.Tensor, rng: random.Random) -> None:
    """What the peers' send kernels write into this rank's slot: dispatch, word j * R + s =
    pack(epoch, count) for every local expert j and source s; combine, word e for every global expert."""
    epoch = int(ws[c.slot])
    words = _signal_words(eng, c)
    n = c.num_experts if c.kind == _core.LL_COMBINE else (c.num_experts // c.num_ranks) * c.num_ranks
    for i in range(n):
        count = rng.randrange(0, c.num_max_tokens + 1) if c.kind == _core.LL_DISPATCH else 0
        words[i] = LIB.ll_host_pack_signal(epoch, count)


def _no_stale_signal(eng: CudaLowLatency, c, ws: torch.Tensor) -> None:
    epoch = int(ws[c.slot])
    words = _signal_words(eng, c)
    used = c.num_experts  # dispatch: E_loc * R = E words; combine: E words
    stale = [i for i in range(used) if int(words[i]) >> EPOCH_BITS_SHIFT == epoch]
    assert not stale, (f"slot {c.slot} (E={c.num_experts}), epoch {epoch}: signal words {stale[:8]} already carry "
                       f"the epoch the receive waits for before any peer signalled")


@needs_lib
@pytest.mark.parametrize("experts_seq", [(48, 8), (8, 48, 8), (4, 64, 16, 4), (96, 32, 96)])
def test_signal_areas_after_a_layout_change(experts_seq):
    """Shape changes on one buffer (2 ranks): dispatch on slot 0, combine on 1, dispatch on 0, then the next
    shape's first call lands on slot 1 whose signal area now covers slot 0's old words (epoch 2 there,
    epoch 2 awaited)."""
    rng = random.Random(len(experts_seq))
    t_max, hidden, num_ranks = 8, 256, 2
    rdma = max(get_low_latency_rdma_size_hint(t_max, hidden, num_ranks, e) for e in experts_seq)
    eng = _cpu_engine(num_ranks, rdma)
    for experts in experts_seq:
        for kind in (_core.LL_DISPATCH, _core.LL_COMBINE, _core.LL_DISPATCH):
            c, ws = _begin(eng, kind, t_max, hidden, experts)
            _no_stale_signal(eng, c, ws)
            _peers_signal(eng, c, ws, rng)
    # a reset is collective: every rank passes two barriers at each layout change (and the first call)
    assert len(eng.comm.barriers) == 2 * len(experts_seq)


@needs_lib
def test_same_layout_needs_no_reset():
    eng = _cpu_engine(2, get_low_latency_rdma_size_hint(8, 256, 2, 8))
    for kind in (_core.LL_DISPATCH, _core.LL_COMBINE) * 3:
        _begin(eng, kind, 8, 256, 8)
    assert len(eng.comm.barriers) == 2  # the first call only
