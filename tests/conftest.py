"""Shared pytest setup for the deep_ep test suite.

* Puts the repository root and ``tests/`` on ``sys.path`` so that ``import deep_ep`` works without
  installing the package, and so that ``tests/dist_utils.py`` / ``tests/reference.py`` import by their
  plain module names (the spawned rank processes import test modules by name too).
* Registers the ``slow`` marker: the full parameter products live behind it (``pytest -m slow``);
  the default run stays small (``pytest -m "not slow"`` is what CI runs).
"""

import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
for _path in (_REPO_ROOT, _TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (full parameter product); deselect with -m 'not slow'")
