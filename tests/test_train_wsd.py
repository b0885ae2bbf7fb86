"""train.py's WSD schedule, kept snapshots and branched cooldowns (gpt_interventions/branch.py)."""

import dataclasses
import json
import math
import os
import re

import pytest

import train
from gpt_interventions.branch import snapshot_path
from gpt_interventions.errors import UsageError
from gpt_interventions.schedule import STORY_START_FACTOR, get_lr
from gpt_interventions.shards import sha256_file
from gpt_interventions.training import TrainConfig, make_plan
from helpers import assert_same_run, cli, curve, make_shards, snapshot, tiny_flags
from model import GPTConfig


def plan_and_config(**kw):
    tc = TrainConfig(**{"max_iters": 100, "max_tokens": 0, "learning_rate": 1e-3, "min_lr": 1e-4, **kw})
    mc = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)
    return make_plan(mc, dataclasses.replace(tc, total_batch_size=0, batch_size=1), 1), tc


def schedule_before_wsd(step, tc, plan, peak=None):
    """get_lr as it was before wsd existed (gpt_interventions/schedule.py, verbatim in substance)."""
    peak = tc.learning_rate if peak is None else peak
    floor = tc.min_lr * (peak / tc.learning_rate)
    if tc.lr_schedule == "story":
        warmup, steps = plan.warmup_steps, plan.max_steps
        if step < warmup:
            return peak * (STORY_START_FACTOR + (1 - STORY_START_FACTOR) * step / warmup)
        return floor + (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2
    if step < plan.warmup_steps:
        return peak * (step + 1) / plan.warmup_steps
    if tc.lr_schedule == "constant":
        return peak
    span = plan.max_steps - 1 - plan.warmup_steps
    progress = (step - plan.warmup_steps) / span if span > 0 else 1.0
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "story"])
@pytest.mark.parametrize("steps, warmup_frac", [(100, 0.0), (100, 0.05), (37, 0.3), (1, 0.0)])
def test_the_schedules_before_wsd_are_unchanged_bit_for_bit(schedule, steps, warmup_frac):
    if schedule == "story" and warmup_frac == 0.0:
        warmup_frac = 0.1  # the story's schedule always warms up
    plan, tc = plan_and_config(lr_schedule=schedule, max_iters=steps, warmup_frac=warmup_frac)
    for peak in (None, 0.025):  # AdamW's and Muon's groups
        assert [get_lr(s, tc, plan, peak) for s in range(steps)] == \
            [schedule_before_wsd(s, tc, plan, peak) for s in range(steps)]


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_is_warmup_then_constant_then_its_cooldown_at_every_step(shape):
    T, W = 50, 5
    plan, tc = plan_and_config(lr_schedule="wsd", max_iters=T, warmup_iters=W, cooldown_frac=0.2, cooldown_shape=shape)
    peak, floor, C = 1e-3, 1e-4, 10  # 20% of 50 steps
    for group_peak in (peak, 0.025):  # Muon's peak follows the same curve, its floor the same fraction
        scale = group_peak / peak
        for s in range(T):
            if s < W:
                want = group_peak * (s + 1) / W
            elif s < T - C:
                want = group_peak
            else:  # Hägele et al.: 1 - (n - (N - N_decay)) / N_decay, or its square root, after step n = s + 1
                done = (s + 1 - (T - C)) / C
                want = scale * (floor + (peak - floor) * (1 - (done if shape == "linear" else done ** 0.5)))
            assert get_lr(s, tc, plan, group_peak if group_peak != peak else None) == pytest.approx(want, rel=1e-12), s
    lrs = [get_lr(s, tc, plan) for s in range(T)]
    assert lrs[T - C - 1] == peak > lrs[T - C] and lrs[-1] == pytest.approx(floor, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[T - C - 1:], lrs[T - C:]))  # strictly down through the cooldown


@pytest.mark.parametrize("flags, message", [
    (dict(cooldown_frac=1.5), "--cooldown_frac must be in [0, 1], got 1.5"),
    (dict(warmup_iters=90), "the warmup of 90 steps overlaps the cooldown, which starts at step 80 of 100"),
    (dict(keep_steps="10,200"), "--keep_steps: step 200 is not a step of this run (1 to 100)"),
    (dict(keep_steps="10;20"), "--keep_steps expects up to 1000 comma-separated step numbers"),
])
def test_impossible_wsd_plans_are_refused(flags, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_and_config(lr_schedule="wsd", **flags)


# --- branched cooldowns -------------------------------------------------------------------------

# dropout, clipping, a warmup and a 25% cooldown: every stream a branch must continue
WSD = dict(lr_schedule="wsd", warmup_iters=2, cooldown_frac=0.25, dropout=0.1, grad_clip=1.0, eval_interval=6,
           charts=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 20-step WSD parent that keeps steps 8, 12 and 16 (its cooldown starts at 15) and rotates
    one other snapshot every 4 steps; the same parent keeping nothing; straight WSD runs of 12 and
    16 steps (cooldowns from 9 and 12); and the branches of 12 and 16 steps from steps 8 and 12."""
    root = tmp_path_factory.mktemp("wsd")
    data = make_shards(root / "data")
    out = {name: str(root / name) for name in ("parent", "plain", "straight12", "straight16", "branch12",
                                                "branch16")}
    train.main(tiny_flags(data, out["parent"], max_iters=20, keep_steps="8,12,16", keep_checkpoints=1,
                          checkpoint_interval=4, **WSD))
    train.main(tiny_flags(data, out["plain"], max_iters=20, **WSD))
    for steps in (12, 16):
        train.main(tiny_flags(data, out[f"straight{steps}"], max_iters=steps, **WSD))
    train.main(tiny_flags(data, out["branch12"], max_iters=12, branch_from=out["parent"], branch_step=8, **WSD))
    train.main(tiny_flags(data, out["branch16"], max_iters=16, branch_from=out["parent"], branch_step=12, **WSD))
    return data, out


def test_keeping_snapshots_changes_nothing_in_the_run_and_rotation_spares_them(runs):
    _, out = runs
    assert_same_run(out["plain"], out["parent"])
    assert sorted(n for n in os.listdir(out["parent"]) if n.startswith("ckpt")) == \
        ["ckpt.pt", "ckpt_0000008.pt", "ckpt_0000012.pt", "ckpt_0000016.pt", "ckpt_0000020.pt"]


@pytest.mark.parametrize("steps, at", [(12, 8), (16, 12)])
def test_a_branched_cooldown_is_bitwise_the_straight_wsd_run_of_its_length(runs, steps, at):
    _, out = runs
    branch, straight = out[f"branch{steps}"], out[f"straight{steps}"]
    assert_same_run(straight, branch)  # every metrics row (the parent's up to the branch point), weights, Adam
    rows = curve(branch)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[at - 1]["lr"] == 3e-3  # the parent's stable phase up to the branch point
    with open(os.path.join(branch, "config.json")) as f:
        record = json.load(f)["branch"]
    path = snapshot_path(out["parent"], at)
    assert record == {"from": out["parent"], "step": at, "tokens": at * 256, "checkpoint": path,
                      "sha256": sha256_file(path)}


def test_a_branch_restarted_with_its_command_goes_on_from_its_own_checkpoint(runs, capsys):
    data, out = runs
    before = snapshot(out["branch12"])
    capsys.readouterr()
    train.main(tiny_flags(data, out["branch12"], max_iters=12, branch_from=out["parent"], branch_step=8, **WSD))
    assert f"{out['branch12']} is finished (12 of 12 steps): nothing to do" in capsys.readouterr().out
    assert snapshot(out["branch12"]) == before


def refusals(out):
    parent = out["parent"]
    return [
        (dict(max_iters=16, branch_from=parent, branch_step=10), f"{parent} kept no checkpoint at step 10 "
         "(kept: 8, 12, 16, 20): branch at a kept step, or train the parent with --keep_steps=10"),
        (dict(max_iters=16, branch_from=parent, branch_step=12, learning_rate=1e-3),
         f"cannot branch from {parent}: the configs differ in more than length and cooldown (learning_rate: "
         "0.003 -> 0.001)"),
        (dict(max_iters=9, branch_from=parent, branch_step=8),
         "cannot branch at step 8: this run's cooldown starts at step 7 of 9"),
        (dict(max_iters=24, branch_from=parent, branch_step=16),
         f"cannot branch from {parent} at step 16: its cooldown started at step 15"),
        (dict(max_iters=16, branch_step=12), "--branch_step needs --branch_from=RUN_DIR"),
        (dict(max_iters=16, branch_from=out["plain"], branch_step=12), f"{out['plain']} kept no checkpoint at "
         "step 12 (it kept none)"),
    ]


def test_what_cannot_be_branched_is_refused_in_one_line_and_nothing_is_written(runs, tmp_path, capsys):
    data, out = runs
    before = snapshot(os.path.dirname(out["parent"]))
    for flags, message in refusals(out):
        code, err = cli(train.main, tiny_flags(data, str(tmp_path / "b"), **{**WSD, **flags}), capsys)
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, (flags, err)
        assert not os.path.exists(tmp_path / "b")
    assert snapshot(os.path.dirname(out["parent"])) == before


def test_only_a_wsd_run_can_be_branched(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    flags = dict(max_iters=4, lr_schedule="cosine", warmup_iters=1)
    train.main(tiny_flags(data, str(tmp_path / "cos"), keep_steps="2", **flags))
    code, err = cli(train.main, tiny_flags(data, str(tmp_path / "b"), branch_from=str(tmp_path / "cos"),
                                           branch_step=2, **flags), capsys)
    assert code == 2 and "its lr_schedule is cosine, not wsd" in err
