"""A tiny low-latency case for compute-sanitizer (memcheck): 2 ranks sharing one GPU, peer memory.

    compute-sanitizer --tool memcheck --target-processes all --error-exitcode 1 \
        python tests/gpu/sanitize_ll_case.py

Runs every LL kernel (prepare, dispatch send/receive with FP8 + UE8M0, combine send/receive with
LogFMT, hook mode) on 6 and 4 tokens, hidden 256, and still compares with the portable engine.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import run_ranks  # noqa: E402
from ll_cases import LLCase, ll_worker  # noqa: E402

TINY = [LLCase("sanitizer: fp8 ue8m0", tokens=(6, 4), t_max=8, fp8=True, round_scale=True, ue8m0=True, hook=True),
        LLCase("sanitizer: logfmt zero-copy", tokens=(6, 4), t_max=8, logfmt=True, zero_copy=True)]


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    transport = os.environ.get("DEEP_EP_LL_TRANSPORT", "peer")
    failures = run_ranks(ll_worker, 2, 4321, transport, TINY, False, timeout_s=240,
                         env={"DEEP_EP_TIMEOUT_S": "120", "DEEP_EP_LL_TRANSPORT": transport})
    report = [line for per_rank in failures for line in per_rank]
    if report:
        print("FAIL:\n" + "\n".join(report))
        return 1
    print("PASS low-latency sanitizer case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
