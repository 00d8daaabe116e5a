"""GPU tests of the CUDA engine's intranode kernels (skipped without a CUDA device and the built core).

N ranks = N processes sharing one GPU over a gloo group, for N = 2, 3, 4, 8: the peers of each rank are
other processes on the same device, mapped with CUDA IPC, and the kernels of different processes
progress by time-slicing (grids stay small: 2 to 4 channels). Every output and handle field is compared
bit for bit with the portable engine (see ``intranode_cases.py``), plus async events and a CUDA-graph
captured ``num_worst_tokens`` dispatch on 2 and 4 ranks.

Runs under pytest, or as a script without pytest (the device check uses that when pytest is missing):
``python tests/gpu/test_intranode_cuda.py [num_ranks ...]``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import make_seed, run_ranks  # noqa: E402
from intranode_cases import CASES, intranode_worker  # noqa: E402


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from deep_ep import _core
    if _core.load() is None:
        return _core.load_error()
    return None


def check_ranks(num_ranks: int, extras: bool) -> None:
    seed = make_seed()
    failures = run_ranks(intranode_worker, num_ranks, seed, CASES, extras, timeout_s=300,
                         env={"DEEP_EP_TIMEOUT_S": "60"})
    report = [line for per_rank in failures for line in per_rank]
    assert not report, f"{len(report)} mismatches (seed {seed}):\n" + "\n".join(report[:60])


try:
    import pytest
except ImportError:  # script mode
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

    @pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
    def test_intranode_matches_portable(num_ranks):
        check_ranks(num_ranks, extras=num_ranks in (2, 4))


if __name__ == "__main__":
    reason = _skip_reason()
    if reason is not None:
        print(f"SKIP: {reason}")
        sys.exit(0)
    sizes = [int(a) for a in sys.argv[1:]] or [2, 3, 4, 8]
    failed = 0
    for n in sizes:
        try:
            check_ranks(n, extras=n in (2, 4))
            print(f"PASS intranode {n} ranks")
        except AssertionError as exc:
            failed += 1
            print(f"FAIL intranode {n} ranks:\n{exc}")
    sys.exit(1 if failed else 0)
