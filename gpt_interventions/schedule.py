"""The learning rate of each optimizer step."""

import math


def get_lr(step, tc, plan):
    """Learning rate of 0-indexed `step`: linear warmup (never 0), then constant or cosine."""
    if step < plan.warmup_steps:
        return tc.learning_rate * (step + 1) / plan.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.learning_rate
    span = plan.max_steps - 1 - plan.warmup_steps
    progress = (step - plan.warmup_steps) / span if span > 0 else 1.0
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.learning_rate - tc.min_lr)
