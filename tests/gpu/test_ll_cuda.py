"""GPU tests of the CUDA low-latency engine (skipped without a CUDA device and the built core).

N ranks = N processes sharing one GPU over a gloo group, with both transports:

* ``peer``: the LL buffers mapped with CUDA IPC (2 and 4 ranks);
* ``nvshmem``: NVSHMEM with several PEs per GPU over its P2P transport (IBGDA disabled, remote transport
  none, UID bootstrap over the gloo group; 2 ranks) - skipped when ``libdeep_ep_nvshmem.so`` or NVSHMEM's
  host library is missing.

Every output is compared with the portable engine (``ll_cases.py``): counts, layout ranges, per-source
blocks (src_info), FP8 bytes and scales bit for bit, combine bit for bit (LogFMT within one code), plus
hook mode, zero-copy, ``out=``, CUDA-graph capture and replay, and shrink-mode masking.

Runs under pytest, or as a script: ``python tests/gpu/test_ll_cuda.py [peer:2 nvshmem:2 ...]``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import make_seed, run_ranks  # noqa: E402
from ll_cases import LL_CASES, NVSHMEM_TEST_ENV, buffer_worker, ll_worker  # noqa: E402

# Several PEs on one GPU: NVSHMEM's P2P transport only (TESTING-ON-THESE-MACHINES.md §1.3); the rest of
# NVSHMEM's environment comes from deep_ep._nvshmem.apply_env_defaults (single_host=True).


def _skip_reason(transport: str = "peer"):
    if not torch.cuda.is_available():
        return "no CUDA device"
    from deep_ep import _core
    if _core.load() is None:
        return _core.load_error()
    if transport == "nvshmem" and _core.load_nvshmem() is None:
        return _core.nvshmem_load_error()
    return None


def check_ll(transport: str, num_ranks: int, extras: bool = True) -> None:
    seed = make_seed()
    env = {"DEEP_EP_TIMEOUT_S": "60", "DEEP_EP_LL_TRANSPORT": transport}
    if transport == "nvshmem":
        env.update(NVSHMEM_TEST_ENV)
    failures = run_ranks(ll_worker, num_ranks, seed, transport, LL_CASES, extras, timeout_s=150, env=env)
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:60])


def check_buffer(transport: str, num_ranks: int) -> None:
    env = {"DEEP_EP_TIMEOUT_S": "60", "DEEP_EP_LL_TRANSPORT": transport}
    if transport == "nvshmem":
        env.update(NVSHMEM_TEST_ENV)
    results = run_ranks(buffer_worker, num_ranks, make_seed(), transport, timeout_s=120, env=env)
    report = [line for per_rank in results for line in per_rank]
    if report and report[0].startswith("SKIP"):
        if pytest is not None:
            pytest.skip(report[0])
        print(report[0])
        return
    assert not report, "\n".join(report[:60])


try:
    import pytest
except ImportError:  # script mode
    pytest = None

if pytest is not None:
    @pytest.mark.skipif(_skip_reason("peer") is not None, reason=str(_skip_reason("peer")))
    @pytest.mark.parametrize("num_ranks", [2, 4])
    def test_ll_peer_matches_portable(num_ranks):
        check_ll("peer", num_ranks)

    @pytest.mark.skipif(_skip_reason("peer") is not None, reason=str(_skip_reason("peer")))
    def test_ll_through_buffer():
        check_buffer("peer", 2)

    # last: NVSHMEM with several PEs per GPU is the least proven set-up (limited MPG without MPS)
    @pytest.mark.skipif(_skip_reason("nvshmem") is not None, reason=str(_skip_reason("nvshmem")))
    @pytest.mark.parametrize("num_ranks", [2])
    def test_ll_nvshmem_matches_portable(num_ranks):
        check_ll("nvshmem", num_ranks)


if __name__ == "__main__":
    runs = [a.split(":") for a in sys.argv[1:]] or [["peer", "2"], ["peer", "4"], ["nvshmem", "2"]]
    failed = 0
    for transport, n in runs:
        reason = _skip_reason(transport)
        if reason is not None:
            print(f"SKIP {transport} {n} ranks: {reason}")
            continue
        try:
            check_ll(transport, int(n))
            print(f"PASS low-latency {transport} {n} ranks")
            if transport == "peer" and n == "2":
                check_buffer("peer", 2)
                print("PASS low-latency through deep_ep.Buffer (peer, 2 ranks)")
        except AssertionError as exc:
            failed += 1
            print(f"FAIL low-latency {transport} {n} ranks:\n{exc}")
    sys.exit(1 if failed else 0)
