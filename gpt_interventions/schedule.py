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
    span = plan.max_steps - 1 - plan.warmup_steps
    progress = (step - plan.warmup_steps) / span if span > 0 else 1.0
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def story_lr(step, lr, min_lr, warmup, steps):
    """The lr the story's code trained `step` with: torch's SequentialLR of
    LinearLR(start_factor=1e-5, end_factor=1, total_iters=warmup) and
    CosineAnnealingLR(T_max=steps - warmup, eta_min=min_lr), stepped once after every optimizer
    step (so step 0 trains at 1e-5 x lr and the last step stays above min_lr). These are the
    closed forms of its recursive updates (equal within 1e-12 relative: tests/test_train.py)."""
    if step < warmup:
        return lr * (STORY_START_FACTOR + (1 - STORY_START_FACTOR) * step / warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2
