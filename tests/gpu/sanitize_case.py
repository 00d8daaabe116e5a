"""A tiny intranode case for compute-sanitizer (memcheck, racecheck): 2 ranks sharing one GPU.

    compute-sanitizer --tool memcheck --target-processes all --error-exitcode 1 \
        python tests/gpu/sanitize_case.py

One channel, a ring of 4 slots (it wraps several times), 8 and 5 tokens, hidden 64: every kernel of the
engine runs (layout, notify, dispatch, cached notify, cached dispatch, combine, trailing-row fill) in a
few seconds even under the sanitizer. Outputs are still compared with the portable engine.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from dist_utils import run_ranks  # noqa: E402
from intranode_cases import Case, intranode_worker  # noqa: E402

TINY = Case("sanitizer: 1 channel, ring of 4", tokens=(8, 5), hidden=64, num_topk=2, experts_per_rank=2,
            config=(2, 2, 4), bias="pair", worst_extra=2)


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    failures = run_ranks(intranode_worker, 2, 1234, [TINY], False, timeout_s=240, env={"DEEP_EP_TIMEOUT_S": "120"})
    report = [line for per_rank in failures for line in per_rank]
    if report:
        print("FAIL:\n" + "\n".join(report))
        return 1
    print("PASS sanitizer case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
