"""Every switch in half precision on the CPU, through train.py's own dtype path: bfloat16 autocast,
and float16 autocast with a GradScaler (Muon under it too), train a few steps to finite losses
close to float32's, and the GradScaler skips no step.

The rows are benchmarks/switches.py's (one switch each on the default model, and
config/modern.toml), plus config/tiny-modern.toml as it is; each runs on the tiny model of
tests/helpers.py, whose float32 run in the same process is the reference.
"""

import os
import sys

import numpy as np
import pytest

import train
from gpt_interventions.checkpoint import load_checkpoint
from helpers import ROOT, curve, tiny_flags

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import switches  # noqa: E402

ROWS = {**switches.SWITCHES, "tiny-modern.toml": [os.path.join(ROOT, "config", "tiny-modern.toml")]}
# Per-step losses against float32's, relative: autocast rounds matmul inputs and outputs to 8
# (bfloat16) or 11 (float16) significant bits. Measured at most 2.3e-4 (bfloat16, tie_weights) and
# 1.1e-4 (float16, n_expert) over these rows and 3 steps, 2026-12-02.
RTOL = {"bfloat16": 2e-3, "float16": 1e-3}
STEPS = 3


def run(data_dir, out, flags, dtype):
    """The logged losses of a 3-step tiny train.py run with the row's flags, and its checkpoint."""
    presets = [f for f in flags if f.endswith(".toml")]
    tiny = tiny_flags(data_dir, str(out), max_iters=STEPS, eval_interval=0, charts=False, dtype=dtype)
    if presets:  # the preset's shape, batch and precision give way to the tiny run's
        tiny = [f for f in tiny if not f.startswith(("--dropout=", "--learning_rate="))]
    train.main([*presets, *tiny, *(f for f in flags if f not in presets)])
    return [r["loss"] for r in curve(out)], load_checkpoint(os.path.join(str(out), "ckpt.pt"))


@pytest.mark.parametrize("name", list(ROWS))
def test_bfloat16_and_float16_with_a_grad_scaler_train_close_to_float32(name, data_dir, tmp_path):
    reference, _ = run(data_dir, tmp_path / "float32", ROWS[name], "float32")
    for dtype, rtol in RTOL.items():
        losses, ckpt = run(data_dir, tmp_path / dtype, ROWS[name], dtype)
        assert len(losses) == STEPS and np.isfinite(losses).all(), (dtype, losses)
        np.testing.assert_allclose(losses, reference, rtol=rtol, err_msg=dtype)
        assert losses != reference, dtype  # autocast did change the arithmetic
        assert ckpt["scaler"]["scale"] == 65536.0 if dtype == "float16" else not ckpt["scaler"]
