"""Every launch command shown in README.md and docs/*.md runs, as written, on this machine.

The commands are read from the ```bash blocks of the docs (a line that starts ranks: spawn through
``tests/multinode_check.py``, ``torchrun`` / ``python -m torch.distributed.run``, one launch per node
with ``WORLD_SIZE=``/``RANK=``, ``mpirun``), so a launch command added to the docs is run here too.
Each runs through bash in the repository root with ``.venv``'s ``python``/``mpirun``/``torchrun`` first
on PATH and these stand-ins for the docs' placeholders: ``$NODE0_ADDR`` = 127.0.0.1, ``$HOSTS`` =
``localhost:4``, port 29500 replaced by a free one, and a command with ``$NODE_RANK`` started twice at
once (``NODE_RANK=0`` and ``1``: two "nodes" on one machine). Each must exit 0, and the process hosting
rank 0 must print ``[multinode_check] PASS``.

Also: the README's ``moe_example.py`` runs as written and prints what it says.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import free_port
from test_mpi import _skip_reason as _mpi_skip_reason

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LAUNCH = re.compile(r"tests/multinode_check\.py|torchrun|torch\.distributed\.run|mpirun|WORLD_SIZE=")


def _bash_blocks(text: str):
    for m in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        yield m.group(1)


def doc_launch_commands():
    """``[(command, [files that show it])]``, in order of first appearance."""
    found = {}
    for path in DOCS:
        for block in _bash_blocks(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                cmd = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
                if cmd and LAUNCH.search(cmd):
                    found.setdefault(cmd, []).append(path.relative_to(ROOT).as_posix())
    return list(found.items())


COMMANDS = doc_launch_commands()


def _kind(cmd: str) -> str:
    if "mpirun" in cmd:
        return "mpirun"
    if "torchrun" in cmd or "torch.distributed.run" in cmd:
        return "torchrun"
    if "$NODE_RANK" in cmd:
        return "per-node env"
    return "spawn"


def test_the_docs_show_every_launcher():
    kinds = {_kind(c) for c, _ in COMMANDS}
    assert kinds == {"spawn", "torchrun", "per-node env", "mpirun"}, COMMANDS
    readme = {_kind(c) for c, files in COMMANDS if "README.md" in files}
    assert readme == kinds, "the README shows one command per launcher"


def _env(**extra):
    env = dict(os.environ)
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
              "TORCHELASTIC_RUN_ID", "DEEP_EP_RANKS_PER_NODE"):
        env.pop(k, None)
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), DEEP_EP_TIMEOUT_S="60",
               OMP_NUM_THREADS="1", NODE0_ADDR="127.0.0.1", HOSTS="localhost:4", **extra)
    return env


@pytest.mark.parametrize("cmd", [c for c, _ in COMMANDS], ids=[f"{i}-{_kind(c)}" for i, (c, _) in enumerate(COMMANDS)])
def test_doc_launch_command_runs(cmd):
    if _kind(cmd) == "mpirun" and _mpi_skip_reason() is not None:
        pytest.skip(_mpi_skip_reason())
    cmd = cmd.replace("29500", str(free_port()))
    nodes = ("0", "1") if "$NODE_RANK" in cmd else (None,)
    procs = [subprocess.Popen(["bash", "-c", cmd], cwd=str(ROOT), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=_env(**({"NODE_RANK": n} if n is not None else {})))
             for n in nodes]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0] * len(procs), f"{cmd}\n" + "\n---\n".join(outs)
    assert "[multinode_check] PASS" in outs[0], f"{cmd}\n{outs[0]}"
    if _kind(cmd) == "torchrun":
        assert "torchrun: 4 ranks" in outs[0] and "4 ranks, 1 node(s)" in outs[0], outs[0]
        assert "failed to bind" not in outs[0].lower(), outs[0]
    if "--ranks-per-node 2" in cmd:
        assert "2 node(s) of 2" in outs[0], outs[0]
    if len(procs) == 2:
        assert "node 1/2: spawning" in outs[1], outs[1]


def test_readme_moe_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith("# moe_example.py")]
    assert len(blocks) == 1, "the README shows moe_example.py once"
    script = tmp_path / "moe_example.py"
    script.write_text(blocks[0])
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert re.search(rf"rank {rank}: engine=\w+, y \(16, 256\)", proc.stdout) and "low-latency path agrees" in proc.stdout, \
            proc.stdout
