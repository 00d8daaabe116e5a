"""CPU tests of the internode (two-hop) engine's host side: the shared call struct, the buffer layout
the kernels and the host agree on, the argument checks of the C ABI, and the collective engine choice
for multi-node layouts without a GPU. The kernels themselves run only in ``tests/gpu`` (virtual nodes
on one GPU: ``tests/gpu/test_internode_cuda.py``)."""

import os

import pytest
import torch

import reference as ref
from dist_utils import make_seed, run_ranks
from deep_ep import _core
from deep_ep.engines import cuda_internode

LIB = _core.load()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"compiled core not built: {_core.load_error()}")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def _align(v, a=128):
    return (v + a - 1) // a * a


def _layout(R, P, C, Qr, Qn, E_loc, row, K, S, combine):
    return LIB.host_internode_layout(R, P, C, Qr, Qn, E_loc, row, K, S, combine,
                                     num_rdma_offsets=_core.NUM_INTERNODE_RDMA_REGIONS,
                                     num_nvl_offsets=_core.NUM_INTERNODE_NVL_REGIONS)


@needs_lib
@pytest.mark.parametrize("combine", [False, True])
@pytest.mark.parametrize("shape", [(4, 2, 3), (8, 4, 10), (8, 1, 2), (16, 8, 12)])
def test_internode_layout_regions(combine, shape):
    R, P, C = shape
    NN = R // P
    Qr, Qn, E_loc, row, K, S = 128, 96, 5, 7168 * 2, 8, 56
    msg, rdma, nvl = _layout(R, P, C, Qr, Qn, E_loc, row, K, S, combine)
    tail = 4 * K if combine else 4 * (2 + 2 * K + S)
    assert msg == row + _align(tail, 16)
    words = _align(2 * C + R + E_loc, 4)
    rdma_sizes = [(R + 1) * 8, R * words * 4, R * words * 4, C * NN * 8, C * NN * Qr * 8, C * NN * Qr * msg,
                  C * NN * Qr * msg]
    nvl_sizes = [C * P * 4, C * P * 4, C * P * Qn * msg]
    for offsets, sizes in ((rdma, rdma_sizes), (nvl, nvl_sizes)):
        assert offsets[0] == 0
        for i, size in enumerate(sizes):
            assert offsets[i] % 128 == 0
            assert offsets[i + 1] - offsets[i] == _align(size), f"region {i}"
    # The barrier words sit at offset 0 whatever the operation: they are never cleared between calls.
    other = _layout(R, P, C, Qr, Qn, 0, row, 0, 0, not combine)[1]
    assert other[0] == rdma[0] == 0 and other[1] == rdma[1], "the sync region must not move between operations"


@needs_lib
@pytest.mark.parametrize("shape", [(4, 2), (8, 4), (8, 2), (16, 8), (32, 8), (6, 3)])
@pytest.mark.parametrize("fp8", [False, True])
def test_size_hints_cover_the_layout(shape, fp8):
    """Config's hints with num_ranks_per_node bound what dispatch and combine need (top-k 32, 4096 experts
    per rank, 128 scale columns)."""
    import deep_ep
    R, P = shape
    config = deep_ep.Config(24, 6, 256, 8, 128)
    hidden = 7168
    nvl_hint = config.get_nvl_buffer_size_hint(hidden * 2, R, num_ranks_per_node=P)
    rdma_hint = config.get_rdma_buffer_size_hint(hidden * 2, R, num_ranks_per_node=P)
    assert nvl_hint % 128 == 0 and rdma_hint % 128 == 0
    C = config.num_channels
    for combine in (False, True):
        row = hidden * (1 if fp8 and not combine else 2)
        S = hidden // 128 if fp8 and not combine else 0
        _, rdma, nvl = _layout(R, P, C, config.num_max_rdma_chunked_recv_tokens,
                               config.num_max_nvl_chunked_recv_tokens, 0 if combine else 4096, row, 32, S, combine)
        assert nvl[-1] <= nvl_hint and rdma[-1] <= rdma_hint
    # one node: DeepEP's formulas, unchanged
    assert config.get_rdma_buffer_size_hint(hidden * 2, 8, num_ranks_per_node=8) == 0


def _call(**kw):
    c = _core.InternodeCall()
    defaults = dict(op=_core.INTERNODE_DISPATCH, rank=0, num_ranks=4, num_ranks_per_node=2, num_channels=4,
                    num_rdma_slots=64, num_nvl_slots=64, num_max_rdma_send=8, num_max_nvl_send=8, num_tokens=16,
                    num_experts=8, num_topk=2, row_bytes=256)
    defaults.update(kw)
    for k, v in defaults.items():
        setattr(c, k, v)
    return c


def _layout_error(**kw):
    try:
        rdma, nvl = LIB.internode_layout_bytes(call=_call(**kw))
    except _core.CoreError as exc:
        return -1, str(exc), 0, 0
    return 0, "", rdma, nvl


@needs_lib
def test_layout_bytes_of_a_valid_call():
    status, err, rdma, nvl = _layout_error()
    assert status == 0, err
    msg, r_off, n_off = _layout(4, 2, 4, 64, 64, 2, 256, 2, 0, False)
    assert (rdma, nvl) == (r_off[-1], n_off[-1])


@needs_lib
@pytest.mark.parametrize("kw, words", [
    (dict(num_ranks_per_node=3), "multiple of ranks per node"),
    (dict(num_ranks=2), "number of nodes must be in [2"),
    (dict(num_ranks=8, num_ranks_per_node=8), "number of nodes must be in [2"),
    (dict(num_ranks_per_node=9, num_ranks=18), "ranks per node must be in [1, 8]"),
    (dict(num_channels=0), "Config.num_sms / 2"),
    (dict(num_max_rdma_send=65), "num_max_rdma_chunked_send_tokens"),
    (dict(row_bytes=200), "multiple of 16 bytes"),
    (dict(num_topk=33), "num_topk"),
    (dict(num_experts=6), "num_experts must be a multiple of num_ranks"),
])
def test_layout_errors_name_the_argument(kw, words):
    status, err, _, _ = _layout_error(**kw)
    assert status == -1
    assert words in err, err


@needs_lib
def test_launch_without_gpu_fails_cleanly():
    with pytest.raises(_core.CoreError, match="deep_ep_internode_launch: .*null runtime"):
        LIB.internode_launch(rt=None, call=_call(), nvl_region_bytes=0, stream=0)


def _probe_worker(rank, num_ranks, group):
    import deep_ep
    from deep_ep._comm import Communicator
    from deep_ep.engines import cuda_internode

    comm = Communicator(group)
    ok, reason, transport, _ = cuda_internode.probe(comm, 2, 1 << 20, 1 << 20)
    no_rdma = cuda_internode.probe(comm, 2, 1 << 20, 0)
    one_node = cuda_internode.probe(comm, num_ranks, 1 << 20, 1 << 20)
    outcomes = []
    # a bad value on one rank only, then values that differ between ranks: every rank raises alike
    for value in ("bogus" if rank == 1 else "auto", "peer" if rank == 0 else "nvshmem"):
        os.environ["DEEP_EP_INTERNODE_TRANSPORT"] = value
        try:
            cuda_internode.probe(comm, 2, 1 << 20, 1 << 20)
            outcomes.append("no error")
        except ValueError as exc:
            outcomes.append(str(exc))
        finally:
            os.environ.pop("DEEP_EP_INTERNODE_TRANSPORT")
    bad_env = outcomes
    comm.close()
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, explicitly_destroy=True)
    result = (ok, reason, no_rdma[:2], one_node[:2], buffer.num_nodes, buffer.engine, buffer.engine_reason,
              transport, bad_env)
    buffer.destroy()
    return result


@no_gpu
@needs_lib
def test_internode_engine_unavailable_without_gpu():
    results = run_ranks(_probe_worker, 4, ranks_per_node=2, timeout_s=180)
    for ok, reason, no_rdma, one_node, num_nodes, engine, engine_reason, transport, bad_env in results:
        assert transport == ""
        assert "rank 1: DEEP_EP_INTERNODE_TRANSPORT must be auto, peer or nvshmem" in bad_env[0], bad_env
        assert "must be the same on every rank" in bad_env[1], bad_env
        assert num_nodes == 2
        assert not ok and ("no CUDA device" in reason or "not built" in reason), reason
        assert no_rdma == (False, no_rdma[1]) and "num_rdma_bytes is 0" in no_rdma[1], no_rdma
        assert one_node[0] is False and "one node" in one_node[1]
        assert engine == "portable" and "CUDA engine is not available" in engine_reason, engine_reason
    assert len({r[1] for r in results}) == 1, "every rank must report the same reason"
    assert len({tuple(r[-1]) for r in results}) == 1, "every rank must raise the same error"


@needs_lib
def test_python_limits_match_the_core():
    lim = _core.limits()
    assert lim["max_ranks"] == cuda_internode.MAX_RANKS_PER_NODE
    assert lim["max_internode_nodes"] == cuda_internode.MAX_NODES


@pytest.mark.parametrize("num_ranks, per_node, num_topk", [(16, 8, 8), (24, 8, 6), (12, 3, 4), (32, 2, 9)])
def test_torch_dispatch_layout_matches_reference(num_ranks, per_node, num_topk):
    """The sync-free layout used beyond 8 ranks (the layout kernel's limit) against the reference,
    with -1 slots and an expert picked twice by one token."""
    gen = torch.Generator().manual_seed(make_seed())
    experts_per_rank = 3
    num_experts = experts_per_rank * num_ranks
    num_tokens = 77
    idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=gen)
    idx[torch.rand(num_tokens, num_topk, generator=gen) < 0.25] = -1
    idx[5, :2] = idx[5, 0] if idx[5, 0] >= 0 else 7  # a duplicate expert
    idx[9] = -1                                       # a token that goes nowhere
    got = cuda_internode.torch_dispatch_layout(idx, num_experts, num_ranks, per_node)
    want = ref.layout(idx, num_experts, ref.Topology(num_ranks, per_node))
    for name, g in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                        "is_token_in_rank"), got):
        w = want[name]
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), name
