"""Shared fixtures. A test file that needs other data defines its own data_dir, which wins."""

import os
import sys

import pytest

# the scripts live at the repository root, nanoGPT style
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_interventions.device import flush_denormals  # noqa: E402
from helpers import make_shards, tiny_run  # noqa: E402  (after the path is set)

# The scripts run the CPU with denormals flushed to zero on every thread (setup_dist); so does
# every test from the start, not only after the first one that calls a script: no result may
# depend on which tests ran before it.
flush_denormals()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Train, val and test shards of the synthetic stream (tests/helpers.py)."""
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """The run directory of a finished 2-step tiny run."""
    return os.path.dirname(tiny_run(data_dir, tmp_path_factory.mktemp("finished") / "run"))


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed, under -q too, so that a failure that hangs on the order replays:
    python -m pytest tests -p randomly --randomly-seed=N (pytest-randomly, requirements-dev.txt)."""
    if config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order: --randomly-seed={config.getoption('randomly_seed')}")
