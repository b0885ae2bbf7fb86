"""torch.compile (inductor, on the CPU) of every switch: forward, backward and three optimizer steps
match eager, and the default and modern models compile to one graph with no graph break and do
not recompile between steps or at validation (dynamo's own counters).

Each inductor compile costs tens of seconds of C++ compilation on two cores, so the switches are
compiled in five models rather than one each: the default model, config/modern.toml (shrunk to
the tiny width), config/tiny-modern.toml (its own shape, a 256-token vocabulary), every other
switch at once (sparse experts among them), and dense experts under muP; a test checks that
these five set every switch. The steps are those of train.py (benchmarks/switches.py
train_steps: step.wrap_model, step.accumulate_gradients, the optimizer and GradScaler), on the
same tokens from the same initial weights, compiled and eager in the same process.
"""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

from gpt_interventions import evaluation
from gpt_interventions.cli import parse_config
from gpt_interventions.device import Dist
from gpt_interventions.loader import eval_windows
from gpt_interventions.shards import find_shards
from gpt_interventions.training import TrainConfig
from helpers import ROOT
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import switches  # noqa: E402

CPU = Dist(0, 0, 1, "cpu")
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32"]
# Each model's flags. Dropout masks are keyed hashes (gpt_interventions/dropout.py), the same compiled
# or eager; fallback_random keeps any draw of torch's own RNG on aten's kernels too.
MODELS = {
    "default": [*TINY, "--vocab_size=256"],
    "modern.toml": [os.path.join(ROOT, "config", "modern.toml"), *TINY, "--vocab_size=256"],
    "tiny-modern.toml": [os.path.join(ROOT, "config", "tiny-modern.toml"), "--vocab_size=256"],  # its own shape
    "the other switches": [*TINY, "--vocab_size=250",
                           "--mlp=swiglu", "--n_expert=3", "--expert_top_k=2", "--moe_aux_loss=0.01",
                           "--z_loss=1e-4", "--tie_weights=True", "--qkv_bias=True", "--init=gpt2",
                           "--pad_vocab=True", "--dropout=0.1", "--grad_clip=1.0"],
    "dense experts": [*TINY, "--vocab_size=256", "--n_expert=2", "--expert_top_k=1", "--moe_impl=dense",
                      "--moe_draws=story", "--parametrization=mup"],
}
# Compiled against eager, float32: the kernels differ (fused, reordered reductions), so the numbers
# differ by float rounding: the losses by at most 1.1e-6 relative (measured). The weights after
# three steps differ more, though the model's function does not: AdamW's first steps are about lr
# times the sign of each gradient, so a gradient of rounding size can flip, and Muon
# orthogonalises its update in bfloat16, so inputs that differ in the last bits round apart.
# Measured over the whole model: 0.0002% (default) to 1.3% (modern.toml) of the distance moved.
LOSS_RTOL, WEIGHT_RTOL = 1e-5, 0.05
SHAPE = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "rope_base", "mup_base_width"}


def configs(name):
    (mc, tc), _, _ = parse_config([*MODELS[name], "--device=cpu", "--dtype=float32", "--total_batch_size=0",
                                   "--compile=True"], [GPTConfig, TrainConfig], "test", "")
    return mc, tc


def test_the_five_models_set_every_switch():
    # a new GPTConfig switch, or a training objective or optimizer switch, must be compiled here too
    default_mc, default_tc = GPTConfig(), TrainConfig()
    changed = set()
    for name in MODELS:
        mc, tc = configs(name)
        changed |= {f for f in vars(mc) if getattr(mc, f) != getattr(default_mc, f)}
        changed |= {f for f in ("z_loss", "moe_aux_loss", "optimizer") if getattr(tc, f) != getattr(default_tc, f)}
    switches_of_the_model = {f.name for f in dataclasses.fields(GPTConfig)} - SHAPE
    assert switches_of_the_model | {"z_loss", "moe_aux_loss", "optimizer"} <= changed
    assert configs("default")[0].dropout == 0.1 and configs("the other switches")[0].init == "gpt2"


def compiled_and_eager(name, after_step=None, steps=3):
    """(compiled run, eager run) of train_steps on the same tokens, each (losses, seconds, model, scaler)."""
    mc, tc = configs(name)
    data = switches.batches(mc, 4, steps)
    switches.fresh_dynamo()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = switches.train_steps(mc, tc, data, CPU, after_step=after_step)
    eager = switches.train_steps(mc, dataclasses.replace(tc, compile=False), data, CPU, after_step=after_step)
    return compiled, eager


def assert_same_training(name, compiled, eager):
    """Losses at every step within LOSS_RTOL; after the last step, the same loss on other tokens
    within LOSS_RTOL and the weights within WEIGHT_RTOL of the distance training moved them."""
    (c_losses, _, c_model, _), (e_losses, _, e_model, _) = compiled, eager
    assert len(c_losses) == 3 and np.isfinite(c_losses).all()
    np.testing.assert_allclose(c_losses, e_losses, rtol=LOSS_RTOL)
    mc, tc = configs(name)
    x, y = (torch.from_numpy(a) for a in switches.batches(mc, 4, 4)[-1])  # tokens no step trained on
    with torch.no_grad():
        after = [m.eval()(x, y)[1].item() for m in (c_model, e_model)]
    np.testing.assert_allclose(*after, rtol=LOSS_RTOL)
    torch.manual_seed(tc.seed)
    start = GPT(mc).state_dict()
    e_params = e_model.state_dict()
    apart = sum((p - e_params[k]).square().sum() for k, p in c_model.state_dict().items()).sqrt()
    moved = sum((e_params[k] - p).square().sum() for k, p in start.items()).sqrt()
    assert apart <= WEIGHT_RTOL * moved, (apart.item(), moved.item())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "modern.toml"])
def test_one_graph_no_break_no_recompilation_at_steps_or_validation(name, data_dir, monkeypatch):
    # train.py's validation on a GPU scores with the compiled forward in eval mode under no_grad
    # (evaluation.evaluate); it takes that path for device type cuda, forced here on CPU tensors
    monkeypatch.setattr(evaluation, "device_type_of", lambda device: "cuda")
    mc, _ = configs(name)
    windows = eval_windows(find_shards(data_dir, "syn", "val"), mc.block_size, 4 * mc.block_size)
    seen = []  # per step: (validation loss, dynamo's (graphs, graph breaks)) after the step, after validating

    def step_then_validate(step, fwd_model):
        counts = switches.dynamo_counts()
        seen.append((evaluation.evaluate(fwd_model, windows, 2, "cpu")[0], counts, switches.dynamo_counts()))
    compiled, eager = compiled_and_eager(name, step_then_validate)
    assert_same_training(name, compiled, eager)
    compiled_val, eager_val = seen[:3], seen[3:]
    counts = [(after_step, after_validation) for _, after_step, after_validation in compiled_val]
    # one training graph (forward and its backward), one validation graph; none again, no break
    assert counts == [((1, 0), (2, 0)), ((2, 0), (2, 0)), ((2, 0), (2, 0))]
    np.testing.assert_allclose([v for v, _, _ in compiled_val], [v for v, _, _ in eager_val], rtol=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-modern.toml", "the other switches", "dense experts"])
def test_compiled_steps_match_eager(name):
    compiled, eager = compiled_and_eager(name)
    assert_same_training(name, compiled, eager)
    assert switches.dynamo_counts() == (1, 0)
