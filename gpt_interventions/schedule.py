"""The learning rate of each optimizer step."""

import math

STORY_START_FACTOR = 1e-5  # the story's LinearLR(start_factor=0.00001)


def get_lr(step, tc, plan, peak=None):
    """Learning rate of 0-indexed `step` under tc.lr_schedule, for a parameter group whose peak is
    `peak` (default tc.learning_rate). Every peak follows the same curve: its floor is min_lr's
    fraction of it (peak / learning_rate is exactly 1.0 for learning_rate itself, so AdamW's lrs
    are those of the formulas with learning_rate and min_lr, bit for bit)."""
    peak = tc.learning_rate if peak is None else peak
    floor = tc.min_lr * (peak / tc.learning_rate)
    if tc.lr_schedule == "story":
        return story_lr(step, peak, floor, plan.warmup_steps, plan.max_steps)
    if step < plan.warmup_steps:  # linear warmup, never 0
        return peak * (step + 1) / plan.warmup_steps
    if tc.lr_schedule == "constant":
        return peak
    if tc.lr_schedule == "wsd":
        return wsd_lr(step, peak, floor, cooldown_start(tc, plan.max_steps), plan.max_steps, tc.cooldown_shape)
    span = plan.max_steps - 1 - plan.warmup_steps
    progress = (step - plan.warmup_steps) / span if span > 0 else 1.0
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def cooldown_start(tc, max_steps):
    """First step of the WSD cooldown: its last round(cooldown_frac x max_steps) steps decay. It
    depends on the run's own length only, so that a cooldown branched from a longer run's stable
    phase is the cooldown of a straight run of the branch's length."""
    return max_steps - round(tc.cooldown_frac * max_steps)


def wsd_lr(step, peak, floor, start, steps, shape):
    """Warmup-stable-decay after the warmup (MiniCPM, arXiv 2404.06395; Hägele et al., arXiv
    2405.18392): the peak until `start`, then over the steps - start steps of the cooldown down to
    the floor, reached at the last step. With p the fraction of the cooldown done after `step`
    ((step - start + 1) / cooldown), linear decays by p and 1-sqrt by sqrt(p) (Hägele et al.'s)."""
    if step < start:
        return peak
    p = (step - start + 1) / (steps - start)
    return floor + (peak - floor) * (1.0 - (p if shape == "linear" else math.sqrt(p)))


def story_lr(step, lr, min_lr, warmup, steps):
    """The lr the story's code trained `step` with: torch's SequentialLR of
    LinearLR(start_factor=1e-5, end_factor=1, total_iters=warmup) and
    CosineAnnealingLR(T_max=steps - warmup, eta_min=min_lr), stepped once after every optimizer
    step (so step 0 trains at 1e-5 x lr and the last step stays above min_lr). These are the
    closed forms of its recursive updates (equal within 1e-12 relative: tests/test_train.py)."""
    if step < warmup:
        return lr * (STORY_START_FACTOR + (1 - STORY_START_FACTOR) * step / warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2
