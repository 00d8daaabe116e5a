"""``benchmarks/gloo_dispatch_floor.py`` (the measurement behind issue 16's open gloo target) still runs
and its socket path delivers exactly the bytes gloo delivers: a run with a fresh seed, an odd hidden
size, a rank count that is not a power of two, and one with no tokens at all."""

import os
import subprocess
import sys

import pytest

from dist_utils import make_seed

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shape", [["--num-tokens", "37", "--hidden", "1000", "--num-experts", "6", "--num-topk", "2"],
                                   ["--num-tokens", "0", "--hidden", "256"]], ids=["odd", "empty"])
def test_floor_script_socket_path_matches_gloo(shape):
    seed = make_seed()
    cmd = [sys.executable, os.path.join(_REPO, "benchmarks", "gloo_dispatch_floor.py"), "--num-ranks", "3",
           "--iters", "1", "--repeats", "1", "--warmup", "0", "--seed", str(seed), *shape]
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, f"seed {seed}\n{out.stdout}\n{out.stderr}"
    assert "delivered the same bytes as gloo on every rank: True" in out.stdout, out.stdout
    for way in ("raw", "gather + gloo", "sockets"):
        assert any(line.startswith(way) for line in out.stdout.splitlines()), out.stdout
