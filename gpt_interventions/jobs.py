"""The runs a sweep plans: each one's preset, the commands that train and evaluate it, and for
a branched cooldown (--budgets) the parent checkpoint it starts from. run.sh and the Slurm array
(gpt_interventions/slurm.py) are written from these."""

import os
import shlex
from dataclasses import asdict, dataclass, replace

from gpt_interventions import ROOT, budgets
from gpt_interventions.branch import snapshot_path
from gpt_interventions.tables import fmt
from gpt_interventions.training import TrainConfig


@dataclass
class Job:
    """One planned run: its preset, its directory, and for a branched cooldown its parent's kept
    checkpoint, which it waits for."""
    name: str
    preset: str
    run_dir: str
    tc: TrainConfig
    waits_for: str = ""


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, (int, float)) else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_preset(path, comment, values, keys):
    with open(path, "w") as fh:
        fh.write(f"# {comment}\n")
        fh.write("".join(f"{k} = {toml_value(values[k])}\n" for k in dict.fromkeys(keys)))


def train_and_eval(job, launch, sc):
    """The shell commands that train and evaluate one planned run."""
    q = shlex.quote
    evals = f" --eval_tokens={sc.test_tokens}" if sc.test_tokens else ""
    return (f"{launch}{q(os.path.join(ROOT, 'train.py'))} {q(job.preset)}; {launch}{q(os.path.join(ROOT, 'eval.py'))} "
            f"{q(job.run_dir)} --dataset={q(job.tc.dataset)} --data_dir={q(job.tc.data_dir)}{evals}")


def plan_jobs(factors, rows, sc, base, base_args, prefix, resolve, label, kind):
    """Write every run's preset; the Jobs in the order they can run (a long run before its branches)
    and the budgets of the plan (None without --budgets). resolve(argv) -> (GPTConfig, TrainConfig);
    label(factors, row): a run's name after its number; kind: what the presets' comments call the plan."""
    fractions = budgets.parse_budgets(sc.budgets) if sc.budgets else None
    jobs, plan_budgets = [], None
    for i, row in enumerate(rows):
        flags = [f"--{k}={v[lvl]}" for f, lvl in zip(factors, row) for k, v in f.levels.items()]
        mc, tc = resolve(base_args + flags)
        extra = []
        if fractions:  # the same schedule and warmup in steps in every run, kept steps to branch from
            tc = budgets.wsd_config(mc, tc, max(sc.torchrun, 1))
            plan_budgets = budgets.plan_budgets(fractions, mc, tc, max(sc.torchrun, 1))
            tc = replace(tc, keep_steps=",".join(str(b.branch_step) for b in plan_budgets[:-1]))
            extra = ["lr_schedule", "warmup_iters", "keep_steps"]
        describe = ", ".join(f.describe(l) for f, l in zip(factors, row))
        for s in range(sc.seeds):
            name = f"{prefix}-{i:02d}-{label(factors, row)}" + (f"-s{tc.seed + s}" if sc.seeds > 1 else "")
            values = {**asdict(mc), **asdict(tc), "seed": tc.seed + s, "run_name": name}
            keys = [k for k in base if k not in ("run_name", "out_dir")] + [k for f in factors for k in f.levels]
            keys += extra + ["seed"] * (sc.seeds > 1) + ["run_name"]
            path = os.path.join(sc.out, f"{name}.toml")
            write_preset(path, f"{kind} {prefix}, run {i}: {describe}", values, keys)
            run_dir = os.path.join("out", name)  # train.py's default: the preset sets no out_dir
            jobs.append(Job(name, path, run_dir, tc))
            for b in (plan_budgets or [])[:-1]:
                branch = f"{name}-b{fmt(b.fraction)}"
                path = os.path.join(sc.out, f"{branch}.toml")
                write_preset(path, f"{kind} {prefix}, run {i}: {describe}; {b.fraction:g} of the budget, "
                             f"a cooldown branched from {name} at step {b.branch_step}",
                             {**values, "run_name": branch, "max_iters": b.steps, "keep_steps": "",
                              "branch_from": run_dir, "branch_step": b.branch_step},
                             keys + ["max_iters", "branch_from", "branch_step"])
                jobs.append(Job(branch, path, os.path.join("out", branch), tc, snapshot_path(run_dir, b.branch_step)))
    return jobs, plan_budgets
