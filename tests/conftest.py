"""Shared fixtures. A test file that needs other data defines its own data_dir, which wins."""

import os
import sys

import pytest

# the scripts live at the repository root, nanoGPT style
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import make_shards, tiny_run  # noqa: E402  (after the path is set)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Train, val and test shards of the synthetic stream (tests/helpers.py)."""
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """The run directory of a finished 2-step tiny run."""
    return os.path.dirname(tiny_run(data_dir, tmp_path_factory.mktemp("finished") / "run"))
