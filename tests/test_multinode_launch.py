"""The multi-node correctness check (``tests/multinode_check.py``) under each launch it documents, on
this machine, with 2 nodes x 2 ranks emulated by ``--ranks-per-node 2``:

* spawn: one command starts all 4 ranks;
* env: two launches, one per "node", with MASTER_ADDR, MASTER_PORT, WORLD_SIZE=2 and RANK=0/1 (what a
  real 2-node run does, one command on each machine);
* mpirun: 4 MPI processes (skipped without mpirun / mpi4py).

Each must end with ``PASS`` on the process hosting rank 0 and status 0 everywhere; a deliberately bad
rendezvous must fail with a clear message instead of hanging.
"""

import os
import subprocess
import sys

import pytest

from dist_utils import free_port
from test_mpi import _find_mpirun, _mpirun_command, _skip_reason as _mpi_skip_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "multinode_check.py")
ARGS = ["--ranks-per-node", "2", "--quick", "--timeout", "120"]


def _env(**extra):
    env = dict(os.environ, DEEP_EP_TIMEOUT_S="60", **extra)
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if k not in extra:
            env.pop(k, None)
    return env


def test_spawn_launch():
    proc = subprocess.run([sys.executable, SCRIPT, "--num-ranks", "4", *ARGS], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "[multinode_check] PASS" in proc.stdout, proc.stdout + proc.stderr
    assert "2 node(s) of 2" in proc.stdout, proc.stdout


def test_env_launch_one_command_per_node():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--num-ranks", "2", *ARGS], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(node)))
             for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "[multinode_check] PASS" in outs[0] and "4 ranks, 2 node(s) of 2" in outs[0], outs[0]
    assert "node 1/2: spawning 2 local ranks" in outs[1], outs[1]


@pytest.mark.skipif(_mpi_skip_reason() is not None, reason=_mpi_skip_reason() or "")
def test_mpirun_launch():
    cmd = _mpirun_command(_find_mpirun()) + [sys.executable, SCRIPT, *ARGS]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "[multinode_check] PASS" in proc.stdout, proc.stdout + proc.stderr
    assert "mpirun: 4 ranks" in proc.stdout, proc.stdout


def test_env_launch_without_rank_fails_clearly():
    proc = subprocess.run([sys.executable, SCRIPT, "--launch", "env", "--num-ranks", "2", *ARGS], cwd=ROOT,
                          env=_env(MASTER_ADDR="127.0.0.1", WORLD_SIZE="2"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs MASTER_ADDR, MASTER_PORT, WORLD_SIZE (nodes) and RANK" in proc.stdout, proc.stdout
