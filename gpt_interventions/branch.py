"""Cooldowns branched from a WSD run's stable phase (MiniCPM, arXiv 2404.06395; Hägele et al.,
arXiv 2405.18392): the loss at several token budgets for one long run plus short decays.

A WSD run asked to `--keep_steps=N,...` keeps ckpt_STEP.pt snapshots there. A branch
(`--branch_from=PARENT --branch_step=N` with its own length) starts from that snapshot in a
directory of its own and trains steps N to its end. Every step's lr, batch and dropout seed is a
function of the step and the run's own config (the WSD cooldown starts at a step computed from
the run's own length), so a branch of length T is, bit for bit, the straight WSD run of length T:
what is refused here is whatever would break that.
"""

import dataclasses
import json
import os

from gpt_interventions.atomic import atomic_write
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.errors import UsageError
from gpt_interventions.rundir import snapshot_name
from gpt_interventions.schedule import cooldown_start
from gpt_interventions.shards import sha256_file
from gpt_interventions.training import make_plan

# What a branch may set otherwise than its parent: its length and its cooldown (and where it
# branches from). The runtime fields (training.RUNTIME_FIELDS) may differ as on a resume.
BRANCH_FIELDS = {"max_iters", "max_tokens", "cooldown_frac", "cooldown_shape", "min_lr", "branch_from",
                 "branch_step", "keep_steps"}


def snapshot_path(out_dir, step):
    """A kept checkpoint's file, as rundir.keep_snapshots names it."""
    return os.path.join(out_dir, snapshot_name(step))


def kept_in(out_dir):
    """The steps of the snapshots in a run directory, in order."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(int(n[5:-3]) for n in names if n.startswith("ckpt_") and n.endswith(".pt") and n[5:-3].isdecimal())


def steps_of(mc, tc, tokens_per_step):
    """(steps, warmup steps, cooldown start) of a config at a given number of tokens per step."""
    plan = make_plan(mc, dataclasses.replace(tc, total_batch_size=tokens_per_step, batch_size=1,
                                             gradient_accumulation_steps=0, auto_batch_size=False), 1)
    return plan.max_steps, plan.warmup_steps, cooldown_start(tc, plan.max_steps)


def load_branch(mc, tc, saved_configs, differences):
    """The parent's snapshot at tc.branch_step as the checkpoint this run starts from, with a
    "branch" record (parent, step, file, sha256) that config.json and the run's checkpoints keep;
    UsageError in one line for what cannot be branched. saved_configs and differences are
    resolve.py's (a checkpoint's configs as today's dataclasses, and what differs)."""
    parent, step = tc.branch_from, tc.branch_step
    if step <= 0:
        raise UsageError("--branch_from needs --branch_step=N, a step the parent kept (its --keep_steps)")
    if os.path.abspath(parent) == os.path.abspath(tc.out_dir):
        raise UsageError(f"--branch_from={parent} is this run's own directory; give the branch another --out_dir")
    path = snapshot_path(parent, step)
    if not os.path.isfile(path):
        kept = kept_in(parent)
        raise UsageError(f"{parent} kept no checkpoint at step {step} (" +
                         (f"kept: {', '.join(map(str, kept))}" if kept else "it kept none") +
                         f"): branch at a kept step, or train the parent with --keep_steps={step}")
    ckpt = load_checkpoint(path)
    saved = saved_configs(ckpt)
    changed = [d for d in differences(saved, (mc, tc)) if d.split(":")[0] not in BRANCH_FIELDS]
    if changed:
        raise UsageError(f"cannot branch from {parent}: the configs differ in more than length and cooldown "
                         f"({'; '.join(changed)}); a branch keeps every other setting of its parent")
    ptc = saved[1]
    if ptc.lr_schedule != "wsd":
        raise UsageError(f"cannot branch from {parent}: its lr_schedule is {ptc.lr_schedule}, not wsd; only a "
                         "stable phase (constant lr) can be branched")
    tokens_per_step = ckpt["data"]["tokens_per_step"]
    parent_steps, parent_warmup, parent_cooldown = steps_of(mc, ptc, tokens_per_step)
    steps, warmup, cooldown = steps_of(mc, tc, tokens_per_step)
    if warmup != parent_warmup:
        raise UsageError(f"cannot branch from {parent}: its warmup is {parent_warmup} steps, this run's would be "
                         f"{warmup}; give the parent's --warmup_iters={parent_warmup}")
    if step > parent_cooldown:
        raise UsageError(f"cannot branch from {parent} at step {step}: its cooldown started at step "
                         f"{parent_cooldown}; branch at a step of its stable phase")
    if step > cooldown or step >= steps:
        raise UsageError(f"cannot branch at step {step}: this run's cooldown starts at step {cooldown} of "
                         f"{steps}; make the branch longer or branch from an earlier step")
    ckpt["branch"] = {"from": parent, "step": step, "tokens": step * tokens_per_step, "checkpoint": path,
                      "sha256": sha256_file(path)}
    ckpt["branching"] = True  # this run starts here (not saved: its own checkpoints resume it)
    return ckpt


def start_branch(out_dir, branch):
    """The parent's metrics rows up to the branch point become the branch's first rows, so that its
    metrics.jsonl reads as a straight run's."""
    rows = []
    source = os.path.join(branch["from"], "metrics.jsonl")
    if os.path.isfile(source):
        with open(source) as f:
            for line in f:
                try:
                    if line.endswith("\n") and json.loads(line)["step"] <= branch["step"]:
                        rows.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a row cut short by a crash
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "metrics.jsonl"), lambda f: f.write("".join(rows).encode()))
