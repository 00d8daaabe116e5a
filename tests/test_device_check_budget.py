"""CPU tests of the device check's time budget (tests/gpu/device_check.sh + tests/gpu/check_budget.py).

A correct kernel must not be reported as TIMEOUT: every step's limit covers its computed need, no step is
started with less than its limit, the whole check stays within the 8-minute budget even when every step
takes its whole limit, the most informative steps come first, and the summary says what ran and what
did not (issue 12, item 7).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "device_check.sh"
sys.path.insert(0, str(ROOT / "tests" / "gpu"))

import check_budget as cb  # noqa: E402


def _script_text() -> str:
    return SCRIPT.read_text()


def test_every_limit_covers_its_computed_need():
    for s in cb.STEPS:
        assert s.need_s > 0 and s.limit_s >= cb.SAFETY * s.need_s, s
    # the examples: 2/3/4/8 time-sliced ranks incl. spawning need far more than the old 110 s
    intranode = sum(s.need_s for s in cb.STEPS if s.name in ("intranode_a", "intranode_b"))
    assert intranode > 110


def test_script_takes_every_limit_from_the_plan():
    """No literal time limit in the script's steps (the old script cut 2/3/4/8 ranks to 110 s, seven internode
    layouts to 220 s, memcheck of 4 ranks to 90 s), and every step it can run is one the planner sized."""
    text = _script_text()
    literal = re.findall(r"^\s*(?:[\w ]+&&\s*)?(?:step|gpu_test)\s+(\w+)\s+(\d+)\s", text, flags=re.M)
    assert not literal, f"steps with a hard-coded limit instead of the computed budget: {literal}"
    arms = set(re.findall(r"^\s*(\w+)\)\s", text, flags=re.M)) - {"*"}
    planned = {s.name for s in cb.STEPS if s.group != "core"}
    assert arms == planned, (arms ^ planned)
    for core in ("build", "load"):
        assert re.search(rf"\bstep {core}\b", text), core


@pytest.mark.parametrize("only", ["", "intranode", "ll", "internode", "intranode_b,ll_nvshmem", "internode_c"])
@pytest.mark.parametrize("budget", [cb.BUDGET_S, 300, 120, 30])
def test_worst_case_stays_within_the_budget(only, budget):
    steps = cb.select(only)
    ran, not_run, elapsed = cb.simulate(steps, budget, lambda s: s.limit_s)
    assert elapsed <= budget
    assert sorted(ran + not_run) == sorted(s.name for s in steps)
    order = [s.name for s in cb.STEPS]
    assert ran == sorted(ran, key=order.index)  # in priority order
    # a step is left out only when its whole limit did not fit in what was left at its turn
    left = budget
    for s in steps:
        assert (s.name in ran) == (s.limit_s <= left), (s.name, s.limit_s, left)
        if s.name in ran:
            left -= s.limit_s


def test_most_informative_steps_run_first():
    ran, not_run, elapsed = cb.simulate(cb.select(""), cb.BUDGET_S, lambda s: s.limit_s)
    assert ran[:5] == ["build", "load", "intranode_a", "ll_peer", "internode_a"], ran
    assert elapsed <= 480
    # each group alone runs all its GPU tests when the steps take their computed need
    for group, must in (("intranode", {"intranode_a", "memcheck", "intranode_b"}), ("ll", {"ll_peer", "ll_memcheck",
                                                                                          "ll_nvshmem"}),
                        ("internode", {"internode_a", "internode_nvshmem"})):
        ran, _, _ = cb.simulate(cb.select(group), cb.BUDGET_S, lambda s: s.need_s)
        assert must <= set(ran), (group, ran)
    # every step fits a budget on its own (with the build and the load), so any step can be rerun
    for s in cb.STEPS:
        ran, _, _ = cb.simulate(cb.select(s.name), cb.BUDGET_S, lambda x: x.limit_s)
        assert s.name in ran, s


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="unknown group or step"):
        cb.select("intranode,gpu_tests")


def _run_script(tmp_path, **env):
    full = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=str(ROOT), env=full,
                          capture_output=True, text=True, timeout=180)


def test_plan_only_prints_the_plan(tmp_path):
    proc = _run_script(tmp_path, DEVICE_CHECK_PLAN_ONLY="1", DEVICE_CHECK_ONLY="ll")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ll_peer" in proc.stdout and "intranode_a" not in proc.stdout
    assert "worst case" in proc.stdout
    bad = _run_script(tmp_path, DEVICE_CHECK_PLAN_ONLY="1", DEVICE_CHECK_ONLY="nonsense")
    assert bad.returncode != 0 and "unknown group or step" in bad.stderr


def test_summary_says_what_ran_and_what_did_not(tmp_path):
    """A budget too small for the build: the build is NOT RUN (not a TIMEOUT), the load runs, and the
    summary names both and how to run the rest (no GPU here: exit 2 after the load)."""
    proc = _run_script(tmp_path, DEVICE_CHECK_BUDGET_S="40")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "TIMEOUT" not in summary, summary
    assert re.search(r"^load\s+PASS", summary, flags=re.M), summary
    assert re.search(r"^ran:\s+load$", summary, flags=re.M), summary
    if "no nvcc" not in summary:
        assert re.search(r"^build\s+NOT RUN\s+needs its \d+s limit", summary, flags=re.M), summary
        assert "run them with DEVICE_CHECK_ONLY=build" in summary, summary
    assert proc.returncode in (1, 2), proc.returncode
