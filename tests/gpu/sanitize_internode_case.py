"""A tiny internode case for compute-sanitizer: 2 virtual nodes x 2 ranks sharing one GPU.

    compute-sanitizer --tool memcheck --target-processes all --error-exitcode 1 \
        python tests/gpu/sanitize_internode_case.py

One channel, RDMA ring of 4 with chunks of 2 and NVL ring of 4 (both wrap several times), hidden 64:
every internode kernel (notify, dispatch, ring reset, cached dispatch, combine, trailing-row fill)
runs in a few seconds under the sanitizer; outputs are still compared with the portable engine.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import run_ranks  # noqa: E402
from internode_cases import SANITIZER_CASE, internode_worker  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    failures = run_ranks(internode_worker, 4, 4321, [SANITIZER_CASE], False, ranks_per_node=2,
                         timeout_s=300, env={"DEEP_EP_TIMEOUT_S": "150"})
    report = [line for per_rank in failures for line in per_rank]
    if report:
        print("FAIL:\n" + "\n".join(report))
        return 1
    print("PASS internode sanitizer case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
