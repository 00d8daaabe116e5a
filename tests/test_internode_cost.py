"""The internode kernels' network cost, counted: the NVSHMEM build of the two-hop kernels runs over the
emulator's NVSHMEM stand-in (``csrc/emu/nvshmem``), which counts every device call per PE (puts,
puts-with-signal, signal operations, quiets, fences, other atomics); the counts of a dispatch, a cached
dispatch and a combine must equal the cost model of ``docs/internode-cost.md`` ("After"), computed here
from the operation's own handle. With every peer load/store reachable no NVSHMEM call is made at all.

``DEEP_EP_INTERNODE_FORCE_NETWORK=1`` sends the RDMA hop between (virtual) nodes through NVSHMEM calls,
as between hosts. The configuration keeps the RDMA rings larger than a channel's tokens (no ring ever
fills), the condition under which the model's counts are exact (docs/internode-cost.md).
"""

import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "tests" / "gpu", ROOT / "tests", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import build_emu  # noqa: E402
import internode_cases  # noqa: E402
from dist_utils import make_seed, run_ranks  # noqa: E402
from intranode_cases import Case, build_inputs  # noqa: E402

EMU_ENV = {"DEEP_EP_ENGINE": "emulated", "DEEP_EP_TIMEOUT_S": "60", "DEEP_EP_EMU_WATCHDOG_S": "60",
           "DEEP_EP_INTERNODE_TRANSPORT": "nvshmem"}
COUNT_NAMES = ("put", "put_signal", "signal", "quiet", "fence", "atomic")

# 2 channels; NVL ring 32 (combine forwarder window 16); RDMA chunk 4, RDMA ring 64 (> tokens per channel)
CASE = Case("cost model", tokens=(40, 24, 33, 17), hidden=256, num_topk=4, experts_per_rank=4, config=(4, 4, 32))
RDMA_SEND, RDMA_SLOTS = 4, 64
KERNEL_WARPS = 16  # kNumInternodeWarps


@pytest.fixture(scope="module")
def emu_lib() -> Path:
    try:
        return build_emu.build("plain")
    except build_emu.BuildError as exc:
        if "not found" in str(exc) or "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b


def _per_channel(prefix_row):
    """Counts per channel from an inclusive prefix over the channels."""
    return [int(prefix_row[c]) - (int(prefix_row[c - 1]) if c > 0 else 0) for c in range(len(prefix_row))]


def model_counts(rank: int, num_ranks: int, ranks_per_node: int, handle: tuple, config, op: str,
                 network: bool) -> dict:
    """docs/internode-cost.md, "After": NVSHMEM calls of this rank for one operation, from its handle.

    op: "dispatch" (notify + dispatch), "cached" (ring reset + dispatch) or "combine" (ring reset +
    combine). ``network``: the other nodes are reached through NVSHMEM calls (else nothing is counted).
    """
    counts = dict.fromkeys(COUNT_NAMES, 0)
    if not network:
        return counts
    R, P = num_ranks, ranks_per_node
    NN, me = R // P, rank // P
    remote_ranks = R - P                       # ranks of the other nodes
    S = min(config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens)
    window = min(KERNEL_WARPS, config.num_max_nvl_chunked_recv_tokens)  # combine forwarder
    batch = min(KERNEL_WARPS, config.num_max_rdma_chunked_recv_tokens)  # combine reducer
    sent = [_per_channel(row) for row in handle[1].tolist()]            # [b][c] my tokens needing node b
    received = [_per_channel(row) for row in handle[3].tolist()]        # [a][c] tokens node a's peer sends me
    others = [b for b in range(NN) if b != me]

    counts["quiet"] = 1                        # barrier 1 (notify or ring reset)
    if op == "dispatch":
        counts["signal"] += remote_ranks       # barrier 1
        counts["put_signal"] += remote_ranks   # meta rows = barrier 2 arrivals
    else:
        counts["signal"] += 2 * remote_ranks   # ring reset: two barriers
    if op in ("dispatch", "cached"):
        counts["put_signal"] += sum(_ceil(n, S) for b in others for n in sent[b])      # sender: a chunk each
        counts["signal"] += sum(_ceil(m, S) for a in others for m in received[a])      # forwarder: a head per chunk
    else:
        counts["put_signal"] += sum(_ceil(m, window) for a in others for m in received[a])  # forwarder windows
        send_rdma_head = handle[8]
        C = handle[1].size(1)
        T = send_rdma_head.size(0)
        for c in range(C):                     # reducer: a head per batch per node it read from
            begin, end = _channel_range(T, C, c)
            for start in range(begin, end, batch):
                rows = send_rdma_head[start:min(start + batch, end)]
                counts["signal"] += sum(1 for b in others if bool((rows[:, b] >= 0).any()))
    return counts


def _channel_range(num_tokens: int, num_channels: int, channel: int):
    """csrc/kernels/buffer_layout.cuh channel_range."""
    per = _ceil(num_tokens, num_channels)
    begin = min(per * channel, num_tokens)
    return begin, min(begin + per, num_tokens)


def _stand_in():
    """The stand-in's counter function, from the libdeep_ep_nvshmem.so this process loaded."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith("libdeep_ep_nvshmem.so")}
    assert len(paths) == 1, f"expected one libdeep_ep_nvshmem.so mapped, got {paths}"
    fn = ctypes.CDLL(paths.pop()).deep_ep_emu_nvshmem_counts
    fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_int]

    def read_and_reset() -> dict:
        out = (ctypes.c_int64 * len(COUNT_NAMES))()
        assert fn(out, len(COUNT_NAMES), 1) == len(COUNT_NAMES)
        return dict(zip(COUNT_NAMES, out))
    return read_and_reset


def cost_worker(rank: int, num_ranks: int, group, seed: int, network: bool):
    import deep_ep
    from intranode_cases import _combine_inputs
    P = int(os.environ["DEEP_EP_RANKS_PER_NODE"])
    cuda_buf, port_buf = internode_cases.make_buffers(group)
    failures = []
    if getattr(cuda_buf._cuda, "transport", None) != "nvshmem":
        return [f"rank {rank}: the internode engine is not over NVSHMEM: {cuda_buf.engine_reason}"]
    config = deep_ep.Config(CASE.config[0], CASE.config[1], CASE.config[2], RDMA_SEND, RDMA_SLOTS)
    device = torch.device("cpu")
    num_experts = CASE.experts_per_rank * num_ranks
    topk_idx, topk_weights, x = build_inputs(CASE, num_ranks, rank, seed, device)
    layout = port_buf.get_dispatch_layout(topk_idx, num_experts)
    kwargs = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                  num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=topk_weights, config=config)
    counts = _stand_in()
    counts()  # buffer set-up is not part of an operation

    def check(what, got, handle, op):
        want = model_counts(rank, num_ranks, P, handle, config, op, network)
        if got != want:
            failures.append(f"rank {rank}: {what}: counted {got}, the cost model says {want}")

    out = cuda_buf.dispatch(x, **kwargs)
    got = counts()
    ref = port_buf.dispatch(x, **kwargs)
    if not torch.equal(out[0], ref[0]):
        failures.append(f"rank {rank}: dispatch recv_x differs from the portable engine")
    handle = out[4]
    check("dispatch", got, handle, "dispatch")

    cuda_buf.dispatch(x, handle=handle, config=config)
    check("cached dispatch", counts(), handle, "cached")

    rows = handle[7].size(0)
    y, w, bias = _combine_inputs(CASE, rows, topk_idx.size(0), seed + 1, device, ref[2])
    comb = cuda_buf.combine(y, handle, topk_weights=w, bias=bias, config=config)
    got = counts()
    comb_ref = port_buf.combine(y, ref[4], topk_weights=w, bias=bias, config=config)
    if not torch.equal(comb[0], comb_ref[0]):
        failures.append(f"rank {rank}: combined_x differs from the portable engine")
    check("combine", got, handle, "combine")
    for b in (cuda_buf, port_buf):
        b.destroy()
    return failures


@pytest.mark.parametrize("nodes,ranks_per_node,network", [(2, 2, True), (2, 2, False), (3, 1, True)],
                         ids=["2x2-network", "2x2-all-p2p", "3x1-network"])
def test_internode_network_calls_match_the_cost_model(emu_lib, nodes, ranks_per_node, network):
    seed = make_seed()
    results = run_ranks(cost_worker, nodes * ranks_per_node, seed, network, ranks_per_node=ranks_per_node,
                        timeout_s=300, env={**EMU_ENV, "DEEP_EP_INTERNODE_FORCE_NETWORK": "1" if network else "0"})
    report = [line for per_rank in results for line in per_rank]
    assert not report, f"seed {seed}:\n" + "\n".join(report)


# ---------------------------------------------------------------- NVSHMEM transports: the host-side probe
_SCENARIOS = {
    "default": {},
    "ibrc without gdrcopy": {"NVSHMEM_IB_ENABLE_IBGDA": "0", "NVSHMEM_REMOTE_TRANSPORT": "ibrc",
                             "NVSHMEM_DISABLE_GDRCOPY": "1"},
    "ucx": {"NVSHMEM_IB_ENABLE_IBGDA": "0", "NVSHMEM_REMOTE_TRANSPORT": "ucx"},
    "none": {"NVSHMEM_IB_ENABLE_IBGDA": "0", "NVSHMEM_REMOTE_TRANSPORT": "none"},
    "bogus": {"NVSHMEM_IB_ENABLE_IBGDA": "false", "NVSHMEM_REMOTE_TRANSPORT": "verbs"},
}


def _probe_hosts_worker(rank: int, num_ranks: int, group):
    """The probe as on N hosts: each node of P ranks reports its own host name."""
    import socket
    from deep_ep._comm import Communicator
    from deep_ep.engines import cuda_internode
    P = int(os.environ["DEEP_EP_RANKS_PER_NODE"])
    comm = Communicator(group)
    socket.gethostname = lambda: f"emulated-host-{rank // P}"  # after the rendezvous, which needs the real one
    out = {}
    names = ("NVSHMEM_IB_ENABLE_IBGDA", "NVSHMEM_REMOTE_TRANSPORT", "NVSHMEM_DISABLE_GDRCOPY")
    scenarios = dict(_SCENARIOS)
    # rank 0 on IBGDA, the others on UCX: NVSHMEM needs one transport
    scenarios["mixed"] = {} if rank == 0 else _SCENARIOS["ucx"]
    for label, env in scenarios.items():
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(env)
        ok, reason, transport, _ = cuda_internode.probe(comm, P, 1 << 20, 1 << 20)
        out[label] = (ok, reason, transport)
    comm.close()
    return out


def test_remote_transport_rule():
    from deep_ep import _nvshmem
    assert _nvshmem.remote_transport({}) == ("IBGDA", "")
    assert _nvshmem.remote_transport(_SCENARIOS["ibrc without gdrcopy"]) == ("IBRC without GDRCopy", "")
    assert _nvshmem.remote_transport({"NVSHMEM_IB_ENABLE_IBGDA": "0"}) == ("IBRC (GDRCopy if found)", "")
    assert _nvshmem.remote_transport(_SCENARIOS["ucx"]) == ("UCX", "")
    name, problem = _nvshmem.remote_transport(_SCENARIOS["none"])
    assert name == "none" and "NVSHMEM_IB_ENABLE_IBGDA=1" in problem and "NVSHMEM_REMOTE_TRANSPORT=ibrc" in problem
    assert "'verbs' is not a transport" in _nvshmem.remote_transport(_SCENARIOS["bogus"])[1]


def test_probe_names_the_nvshmem_transport_between_hosts(emu_lib):
    """IBRC without GDRCopy is accepted (the kernels use only puts-with-signal and 64-bit signal
    operations); a set-up with no transport between hosts is refused on every rank alike, naming the
    variables and the fix."""
    results = run_ranks(_probe_hosts_worker, 4, ranks_per_node=2, timeout_s=180,
                        env={"DEEP_EP_ENGINE": "emulated", "DEEP_EP_TIMEOUT_S": "60"})
    for label in results[0]:
        assert len({r[label] for r in results}) == 1, f"{label}: the ranks disagree: {[r[label] for r in results]}"
    got = results[0]
    assert got["default"][:3:2] == (True, "nvshmem") and "RDMA hop over NVSHMEM (IBGDA)" in got["default"][1]
    ok, reason, transport = got["ibrc without gdrcopy"]
    assert ok and transport == "nvshmem" and "NVSHMEM (IBRC without GDRCopy)" in reason, reason
    assert got["ucx"][0] and "NVSHMEM (UCX)" in got["ucx"][1]
    ok, reason, transport = got["none"]
    assert not ok and transport == "" and "NVSHMEM_REMOTE_TRANSPORT=none" in reason and "IBGDA=1" in reason, reason
    assert not got["bogus"][0] and "'verbs'" in got["bogus"][1]
    ok, reason, _ = got["mixed"]
    assert not ok and "differs between ranks" in reason and "rank 0: IBGDA" in reason and "rank 1: UCX" in reason


def _ll_probe_hosts_worker(rank: int, num_ranks: int, group):
    """The low-latency probe as on 2 hosts (one rank each), per NVSHMEM transport set-up."""
    import socket
    from deep_ep._comm import Communicator
    from deep_ep.engines import cuda_ll
    comm = Communicator(group)
    socket.gethostname = lambda: f"emulated-host-{rank}"  # after the rendezvous, which needs the real one
    out = {}
    names = ("NVSHMEM_IB_ENABLE_IBGDA", "NVSHMEM_REMOTE_TRANSPORT", "NVSHMEM_DISABLE_GDRCOPY")
    for label, env in _SCENARIOS.items():
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(env)
        ok, reason, transport, _ = cuda_ll.probe_ll(comm, 1 << 20, True)
        out[label] = (ok, reason, transport)
    comm.close()
    return out


def test_ll_probe_refuses_ibrc_without_gdrcopy_between_hosts(emu_lib):
    """The low-latency kernels still set their flags with 4-byte NVSHMEM atomics: across hosts, IBRC
    without GDRCopy is refused on every rank alike (the Buffer falls back to the portable engine with
    this reason), naming the transport and the fix; IBGDA and UCX are accepted."""
    results = run_ranks(_ll_probe_hosts_worker, 2, timeout_s=180,
                        env={"DEEP_EP_ENGINE": "emulated", "DEEP_EP_TIMEOUT_S": "60"})
    for label in results[0]:
        assert len({r[label] for r in results}) == 1, f"{label}: the ranks disagree: {[r[label] for r in results]}"
    got = results[0]
    assert got["default"][0] and got["default"][2] == "nvshmem", got["default"]
    assert got["ucx"][0] and got["ucx"][2] == "nvshmem", got["ucx"]
    ok, reason, transport = got["ibrc without gdrcopy"]
    assert not ok and transport == "", reason
    assert "(IBRC without GDRCopy) is not usable" in reason and "NVSHMEM_IB_ENABLE_IBGDA=1" in reason \
        and "GDRCopy" in reason, reason
    ok, reason, _ = got["none"]
    assert not ok and "NVSHMEM_REMOTE_TRANSPORT=none" in reason, reason
