"""The launcher of the multi-node correctness check (``tests/multinode_check.py``) fails clearly.

The launches that work (spawn, torchrun, one launch per node, mpirun) are the commands the docs show;
``tests/test_docs_commands.py`` runs every one of them as written. Here: a deliberately incomplete
rendezvous must fail with a clear message instead of hanging.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "multinode_check.py")
ARGS = ["--ranks-per-node", "2", "--quick", "--timeout", "120"]


def _env(**extra):
    env = dict(os.environ, DEEP_EP_TIMEOUT_S="60", **extra)
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
              "TORCHELASTIC_RUN_ID"):
        if k not in extra:
            env.pop(k, None)
    return env


def test_env_launch_without_rank_fails_clearly():
    proc = subprocess.run([sys.executable, SCRIPT, "--launch", "env", "--num-ranks", "2", *ARGS], cwd=ROOT,
                          env=_env(MASTER_ADDR="127.0.0.1", WORLD_SIZE="2"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs MASTER_ADDR, MASTER_PORT, WORLD_SIZE (nodes) and RANK" in proc.stdout, proc.stdout


def test_torchrun_launch_without_its_variables_fails_clearly():
    proc = subprocess.run([sys.executable, SCRIPT, "--launch", "torchrun", *ARGS], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--launch torchrun needs torchrun's RANK, WORLD_SIZE, LOCAL_RANK" in proc.stdout, proc.stdout
