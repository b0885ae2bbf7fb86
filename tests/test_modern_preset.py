"""config/modern.toml and config/tiny-modern.toml, and every modern switch at once: they compose
with each other, train, resume bitwise on the CPU, and evaluate (interventions.md, Modern
interventions)."""

import os

import pytest

import eval as eval_script
import train
from gpt_interventions.cli import load_preset
from gpt_interventions.errors import run_main
from gpt_interventions.resolve import resolve_config
from helpers import EXACT, ROOT, assert_same_run, make_shards, read_metrics, stop_after, tiny_flags, torchrun

# the switches config/modern.toml adds to the story's best stack (the speedrun's kept changes)
SWITCHES = {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "bias": False,
            "logit_softcap": 15.0, "zero_init_proj": True, "optimizer": "muon"}


def preset(name):
    return load_preset(os.path.join(ROOT, "config", name))


def test_modern_is_the_best_stack_plus_the_switches():
    assert preset("modern.toml") == {**preset("best.toml"), **SWITCHES}


def test_tiny_modern_is_tiny_plus_the_same_switches():
    assert preset("tiny-modern.toml") == {**preset("tiny.toml"), **SWITCHES}


def test_modern_resolves_to_the_switches_on_the_story_baseline():
    mc, tc, _ = resolve_config([os.path.join(ROOT, "config", "modern.toml"), "--dry_run=True"], "")
    for name, value in SWITCHES.items():
        assert getattr(mc if hasattr(mc, name) else tc, name) == value, name
    # what the preset does not name stays the story's: its batch, tokens, precision and init
    assert (tc.total_batch_size, tc.max_tokens, tc.dtype, mc.init, mc.n_layer) == (98304, 3_260_190_720, "float16",
                                                                                  "torch", 12)


# every switch at once, experts and z-loss included, over warmup, cosine, clipping and dropout
EVERYTHING = {**EXACT, **SWITCHES, "mlp": "swiglu", "z_loss": 1e-4, "n_expert": 3, "expert_top_k": 2,
              "moe_aux_loss": 0.01, "muon_lr": 0.02}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def test_every_switch_at_once_trains_resumes_bitwise_and_evaluates(data_dir, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    train.main(tiny_flags(data_dir, str(ref), **EVERYTHING))
    losses = [r["loss"] for r in read_metrics(ref) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1  # it learns (12 steps, most of them in warmup and cooldown)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_after(m, 5)  # SIGTERM mid-run: checkpoint at step 6 and stop
        train.main(tiny_flags(data_dir, str(out), **EVERYTHING))
    assert max(r["step"] for r in read_metrics(out)) == 6
    train.main(tiny_flags(data_dir, str(out), **EVERYTHING))  # the same command continues it
    assert_same_run(ref, out)
    capsys.readouterr()
    run_main(eval_script.main, [str(out), f"--data_dir={data_dir}", "--dataset=syn", "--split=val",
                                "--eval_tokens=1024", "--ledger="])
    last_val = [r for r in read_metrics(out) if "val_loss" in r][-1]["val_loss"]
    assert f"syn/val loss {last_val:.6f}" in capsys.readouterr().out


@pytest.mark.slow
def test_every_architecture_switch_under_two_rank_ddp_matches_one_process(data_dir, tmp_path):
    # AdamW here: Muon's own DDP test (tests/test_muon.py) bounds its bfloat16 Newton-Schulz rounding
    # dropout too: its masks follow each sequence, so one process and two ranks drop the same units
    flags = {**EVERYTHING, "optimizer": "adamw", "max_iters": 6, "eval_interval": 3,
             "checkpoint_interval": 6}
    train.main(tiny_flags(data_dir, str(tmp_path / "one"), **flags))
    proc = torchrun(os.path.join(ROOT, "train.py"), tiny_flags(data_dir, str(tmp_path / "two"), **flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):  # the same tokens per step; only the order of the sums differs
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
        if "expert_frac" in a:  # routing of the same fixed tokens by nearly the same weights
            for layer_a, layer_b in zip(a["expert_frac"], b["expert_frac"], strict=True):
                assert layer_a == pytest.approx(layer_b, abs=0.02)
