"""Losses at several token budgets for about the price of the longest: one WSD run per
configuration and seed, plus a cooldown branched from its stable phase for each shorter budget
(MiniCPM, arXiv 2404.06395; Hägele et al., arXiv 2405.18392; gpt_interventions/branch.py).

sweep.py plans them with `--budgets=0.25,0.5,1` (fractions of the preset's length) and prices
them against separate runs of each length.
"""

import dataclasses
from dataclasses import dataclass

from gpt_interventions.errors import UsageError
from gpt_interventions.schedule import cooldown_start
from gpt_interventions.training import make_plan


@dataclass
class Budget:
    fraction: float          # of the long run's steps
    steps: int               # the run's length in optimizer steps
    branch_step: int | None  # the long run's kept step this budget's cooldown branches from; None: the long run
    tokens: int              # training tokens, steps x tokens per step

    @property
    def trained(self):
        """Steps this budget trains itself: a branch only its cooldown."""
        return self.steps - (self.branch_step or 0)


def parse_budgets(text):
    """'0.25,0.5,1' -> [0.25, 0.5, 1.0]: distinct fractions in (0, 1], the last the long run (1)."""
    try:
        fractions = sorted({float(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise UsageError(f"--budgets expects comma-separated fractions of the run, e.g. 0.25,0.5,1; got {text!r}") \
            from None
    if len(fractions) < 2 or not 0 < fractions[0] or fractions[-1] != 1:
        raise UsageError(f"--budgets={text}: give two or more fractions in (0, 1], the largest 1 (the preset's "
                         "length), e.g. 0.25,0.5,1")
    return fractions


def wsd_config(mc, tc, ranks):
    """The config every run of a budget plan shares: lr_schedule=wsd, and its warmup in steps (a
    warmup_frac would give each branch another warmup, and a branch must share its parent's)."""
    tc = dataclasses.replace(tc, lr_schedule="wsd")
    return dataclasses.replace(tc, warmup_iters=make_plan(mc, tc, ranks).warmup_steps)


def plan_budgets(fractions, mc, tc, ranks):
    """The budgets of a WSD config (wsd_config's) on `ranks` ranks: the long run, then each shorter
    budget branched at its own cooldown start (the latest step it can share with the long run)."""
    plan = make_plan(mc, tc, ranks)
    long = plan.max_steps
    out = []
    for f in fractions:
        steps = round(f * long)
        if f == 1:
            out.append(Budget(f, long, None, long * plan.tokens_per_step))
            continue
        start = cooldown_start(tc, steps)
        if start < max(plan.warmup_steps, 1) or start > cooldown_start(tc, long):
            raise UsageError(f"--budgets: {f:g} of {long} steps is {steps} steps, whose cooldown (from step {start}) "
                             f"cannot branch from the long run after its warmup of {plan.warmup_steps} steps; "
                             "use larger budgets or a longer run")
        out.append(Budget(f, steps, start, steps * plan.tokens_per_step))
    return out


def cost_line(budgets, tc):
    """What the plan trains per configuration and seed against separate runs of every budget."""
    long = budgets[-1].steps
    branched = sum(b.trained for b in budgets) / long
    separate = sum(b.steps for b in budgets) / long
    names = ", ".join(f"{b.fraction:.0%}" for b in budgets)
    return (f"budgets {names} of {long} steps ({tc.cooldown_frac:.0%} cooldowns, {tc.cooldown_shape}): one WSD run "
            f"and {len(budgets) - 1} branched cooldown(s) per configuration and seed train {branched:.3f} runs' "
            f"tokens instead of {separate:.3f} for separate runs ({1 - branched / separate:.0%} less)"), branched
