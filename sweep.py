"""Plan intervention experiments, then estimate their effects from the finished runs.

    python sweep.py plan --factor grad_clip=0,3.5 --factor qkv_bias=False,True ... \\
        [--preset=config/tiny.toml] [--design=one-at-a-time|full|fractional] [--seeds=N] [--out=DIR]
        [--effect=0.01 --noise_std=0.0017 (or --noise_from=RUNS) --hours_per_run=3 --usd_per_hour=2.5]
    sh DIR/run.sh                       # trains and evaluates every run, then compares them
    python sweep.py analyze out/NAME-* [--factor ...] [--split=test|val]
    python sweep.py ladder --factor qkv_bias=False,True --rungs=2,4,6 --seeds=3 [--preset=TARGET.toml]
    python sweep.py ladder --analyze out/NAME-* [--factor ...] [--preset=TARGET.toml]

With --effect, plan says how many seeds per configuration detect that effect with 80% power
under the design and the correction in force, and what the runs cost; without --seeds it plans them.

A factor is `field=low,high`; the first level is the baseline's. Fields that move together form
one factor: --factor 'learning_rate=0.0004,0.0014 lr_schedule=constant,cosine'.
"""

import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, replace

from gpt_interventions import ROOT, budgets, design, ladder, slurm, stats
from gpt_interventions.cli import field, load_preset, parse_config
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.jobs import plan_jobs, train_and_eval
from gpt_interventions.results import IGNORED, REPLICATE, SPLIT_HELP, SPLITS, group_runs, judged_lines, load_runs
from gpt_interventions.stats import CORRECTIONS
from gpt_interventions.verdicts import pooled_std
from gpt_interventions.tables import fmt, table
from gpt_interventions.training import TrainConfig
from model import GPTConfig

USAGE = ("plan --factor FIELD=A,B ... [--key=value ...] | analyze RUN_DIR_OR_GLOB... [--factor ...] | "
         "ladder --factor FIELD=A,B [--rungs=2,4,6] | ladder --analyze RUN_DIR_OR_GLOB...")


@dataclass
class SweepConfig:
    preset: str = field("", "plan: base preset the runs start from, e.g. config/tiny.toml; empty: the defaults")
    design: str = field("one-at-a-time", "plan: which runs", choices=("one-at-a-time", "full", "fractional"))
    fraction: int = field(1, "plan: p of a 2^(k-p) fractional design (1: half, 2: quarter)")
    with_baseline: bool = field(False, "plan: fractional designs contain the all-first-levels run "
                                       "(E=-ABCD for five factors) instead of the principal fraction")
    seeds: int = field(1, "plan: replicates of every run, with seeds seed, seed+1, ...")
    out: str = field("sweeps/sweep", "plan: directory for the presets and run.sh; its name prefixes the runs")
    torchrun: int = field(0, "plan: GPUs per run through torchrun; 0: plain python")
    test_tokens: int = field(0, "plan: eval.py --eval_tokens of each test loss; 0: the whole test split")
    effect: float = field(0.0, "plan: the smallest true change of test loss to detect; prints the seeds it needs "
                               "for 80% power (and plans them if --seeds is not given); 0: no power plan")
    hours_per_run: float = field(0.0, "plan: wall-clock hours of one run, for GPU-hours and cost")
    usd_per_hour: float = field(0.0, "plan: price of one GPU-hour")
    correction: str = field("holm", "family-wise correction of the verdicts (plan: the power it needs)",
                            choices=CORRECTIONS)
    noise_std: float = field(0.0, "run-to-run std of the test loss: plan's power; analyze's when the runs "
                                  "hold no replicates")
    noise_n: int = field(0, "analyze: how many runs noise_std was measured on; 0: a known std (z)")
    noise_from: str = field("", "finished runs (directories or a glob) whose replicates' pooled std is the noise")
    budgets: str = field("", "plan: token budgets as fractions of the preset's length, e.g. 0.25,0.5,1: one WSD run "
                             "per configuration and seed, and a cooldown branched from it for each shorter budget")
    launcher: str = field("sh", "plan: sh: run.sh runs every run in turn; slurm: also an sbatch array script, one "
                                "task a run", choices=("sh", "slurm"))
    split: str = field("test", f"analyze: {SPLIT_HELP}", choices=SPLITS)
    rungs: str = field("2,4,6", "ladder: n_layer of each rung; width and heads follow the target's (--preset's) "
                                "width per layer and head size (gpt_interventions/ladder.py)")
    tokens_per_param: float = field(0.0, "ladder: training tokens per parameter of every rung; 0: the target's")
    mup: bool = field(True, "ladder: parametrization=mup with the target's width as mup_base_width")
    analyze: bool = field(False, "ladder: fit the finished runs and predict the target instead of planning")
    bootstrap: int = field(1000, "ladder --analyze: bootstrap draws over seeds")


@dataclass
class Factor:
    name: str
    levels: dict  # field -> [value at each level], typed as the config declares

    def level_of(self, config):
        for i in range(len(next(iter(self.levels.values())))):
            if all(config.get(k) == vals[i] for k, vals in self.levels.items()):
                return i
        return None

    def describe(self, i):
        return ", ".join(f"{k}={fmt(v[i])}" for k, v in self.levels.items())


def split_factors(argv):
    """Pull `--factor SPEC` / `--factor=SPEC` out of argv (repeatable, unlike a config flag)."""
    specs, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--factor":
            specs.append(next(it, None) or "")
        elif arg.startswith("--factor="):
            specs.append(arg[len("--factor="):])
        else:
            rest.append(arg)
    return specs, rest


def parse_factor(spec):
    """'lr=1,2 schedule=constant,cosine' -> Factor with typed levels (parse_config checks them)."""
    levels = {}
    for part in spec.split():
        key, eq, values = part.partition("=")
        if not eq or "," not in values:
            raise UsageError(f"--factor {spec!r}: expected FIELD=LEVEL1,LEVEL2[,...]")
        levels[key] = [{**asdict(mc), **asdict(tc)}[key] for mc, tc in (resolve([f"--{key}={v}"]) for v in values.split(","))]
    if not levels or len({len(v) for v in levels.values()}) != 1:
        raise UsageError(f"--factor {spec!r}: every field of one factor needs the same number of levels")
    return Factor(next(iter(levels)), levels)


def resolve(argv):
    return parse_config(argv, [GPTConfig, TrainConfig], "train.py", "")[0]


def plan_rows(factors, sc):
    """Level indices of each run: one-at-a-time (baseline + one change each), full or fractional."""
    k = len(factors)
    if sc.design == "one-at-a-time":
        rows = [[0] * k]
        for j, f in enumerate(factors):
            rows += [[i if jj == j else 0 for jj in range(k)] for i in range(1, len(f.levels[f.name]))]
        return rows, None
    if any(len(f.levels[f.name]) != 2 for f in factors):
        raise UsageError(f"--design={sc.design} needs exactly two levels per factor")
    try:
        X, gens = design.fractional(k, sc.fraction if sc.design == "fractional" else 0, sc.with_baseline)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return [[(v + 1) // 2 for v in x] for x in X], gens


def run_label(factors, row):
    parts = [f"{f.name}{fmt(f.levels[f.name][i])}" for f, i in zip(factors, row) if i]
    return "_".join(parts) or "baseline"


def plan(factors, sc, argv, explicit, rows=None, tail=None, label=None):
    """Write a preset per run and run.sh; rows: the level indices of each run (default: the design's);
    tail(python, out_root, names): the script's last lines (default: compare.py, then analyze);
    label(factors, row): a run's name after its number (default: run_label)."""
    rows, gens = (rows, None) if rows is not None else plan_rows(factors, sc)
    if sc.budgets and (sc.design != "one-at-a-time" or tail is not None):
        raise UsageError("--budgets plans one-at-a-time designs (compare.py judges each budget); drop --design")
    power_lines = []
    if sc.effect:
        seeds, power_lines = power_plan(factors, rows, sc, explicit)
        sc = replace(sc, seeds=seeds)
    base = load_preset(sc.preset) if sc.preset else {}
    base_args = [sc.preset] if sc.preset else []
    prefix = os.path.basename(os.path.normpath(sc.out))
    os.makedirs(sc.out, exist_ok=True)
    jobs, plan_budgets = plan_jobs(factors, rows, sc, base, base_args, prefix, resolve, label or run_label,
                                   "ladder" if tail else f"{sc.design} sweep")
    # POSIX sh (Debian's and Ubuntu's sh is dash), the Python that planned it (the project's venv),
    # the scripts by absolute path, and the directory it was planned in for every relative path
    q = shlex.quote
    python = q(sys.executable)
    launch = (f"{python} -m torch.distributed.run --standalone --nproc_per_node={sc.torchrun} " if sc.torchrun
              else f"{python} ")
    script = ["#!/bin/sh", f"# {len(jobs)} runs, written by: python sweep.py " + " ".join(map(q, argv)),
              "# Run it with sh from anywhere: it works in the directory it was planned in, with the Python",
              "# that planned it. A run with a test result already is skipped, so the script can be run",
              "# again after a failure.", "set -eu", f"cd {q(os.getcwd())}"]
    for job in jobs:  # an if-body, not an && list: under set -e a failed run stops the script there
        script.append(f"if [ ! -f {q(job.run_dir + '/eval.json')} ]; then {train_and_eval(job, launch, sc)}; fi")
    names = [job.name for job in jobs]
    out_root = os.path.join("out", prefix)
    factor_args = " ".join(f"--factor {shlex.quote(' '.join(f'{k}={chr(44).join(map(str, v))}' for k, v in f.levels.items()))}"
                           for f in factors)
    if tail is not None:
        script += tail(python, out_root, names)
    elif any(rows[0]):  # the principal fraction of an odd k leaves the all-first-levels run out
        script.append("# the baseline configuration is not in this fraction: compare.py takes the first run as its baseline")
    # a factorial's effects need no baseline: a refused table (a diverged baseline) does not stop them
    survive = " || echo 'compare.py judged nothing; the factorial analysis follows'" * (sc.design != "one-at-a-time")
    compare_line = (f"{python} {q(os.path.join(ROOT, 'compare.py'))} {q(out_root + '-*')} --baseline={q(names[0])} "
                    f"--charts={q(sc.out + '/charts')} --correction={sc.correction}")
    if tail is None:
        script.append(compare_line + survive)
    if sc.design != "one-at-a-time" and tail is None:
        script.append(f"{python} {q(os.path.join(ROOT, 'sweep.py'))} analyze {q(out_root + '-*')} {factor_args} "
                      f"--correction={sc.correction}")
    with open(os.path.join(sc.out, "run.sh"), "w") as fh:
        fh.write("\n".join(script) + "\n")
    os.chmod(os.path.join(sc.out, "run.sh"), 0o755)
    configurations = len(rows) * sc.seeds
    print(f"{'ladder' if tail else sc.design + ' design'}, {len(rows)} configurations x {sc.seeds} seed(s) = "
          f"{configurations} runs" + (f", each with {len(plan_budgets) - 1} branched cooldown(s): {len(jobs)} runs in "
                                      "all" if plan_budgets else ""))
    for j, f in enumerate(factors):
        print(f"  {design.LETTERS[j]}: {f.describe(0)}  ->  {f.describe(1) if len(f.levels[f.name]) == 2 else '...'}")
    if gens is not None:
        print(alias_report([[2 * l - 1 for l in r] for r in rows], len(factors), gens))
    lengths = configurations
    if plan_budgets:
        line, per_run = budgets.cost_line(plan_budgets, jobs[0].tc)
        power_lines.append(line)
        lengths = configurations * per_run
    for line in power_lines + cost_lines(lengths, sc):
        print(line)
    print(f"wrote {len(names)} presets and {os.path.join(sc.out, 'run.sh')}; run it with: sh {sc.out}/run.sh")
    if sc.launcher == "slurm":
        path = slurm.write_array(sc.out, jobs, [train_and_eval(job, "$LAUNCH ", sc) for job in jobs],
                                 python, sc.torchrun, argv)
        print(f"wrote {path}; submit it with: sbatch {path}; when its tasks are done: {compare_line}")
    return names


def given_noise(sc):
    """(std, runs it was measured on or None if known, where it comes from) from --noise_std
    (with --noise_n, measured on that many runs) or the replicates of --noise_from; None if neither."""
    if sc.noise_std and sc.noise_from:
        raise UsageError("--noise_std and --noise_from: give one")
    if sc.noise_std > 0:
        return sc.noise_std, (sc.noise_n if sc.noise_n >= 2 else None), "given"
    if sc.noise_from:
        runs = [r for r in load_runs([sc.noise_from], sc.split) if r.loss is not None]
        pooled = pooled_std(group_runs(runs, runs[0])) if runs else None
        if pooled is None or pooled[0] == 0:
            raise UsageError(f"--noise_from={sc.noise_from}: no replicates with a spread among its "
                             f"{len(runs)} run(s) to measure the noise")
        return pooled[0], pooled[1] + 1, f"pooled over the replicates of {sc.noise_from}, df {pooled[1]}"
    return None


def planning_noise(sc):
    """(std, where it comes from) for the power plan."""
    noise = given_noise(sc)
    if noise is None:
        raise UsageError("--effect needs the run-to-run noise: --noise_std=STD (e.g. 0.0017) or --noise_from=RUNS")
    return noise[0], noise[2]


def power_plan(factors, rows, sc, explicit):
    """(seeds per configuration, lines to print) for --effect at the design and correction in force.

    One at a time: each arm against the baseline, seed by seed (the plan gives every configuration
    the same seeds, so compare.py pairs them), the pairs' correlation taken as 0 (the worst case).
    Two-level designs: each effect from all runs, its standard error from the design.
    Planned at Bonferroni's alpha / m, which Holm's correction never needs more power than."""
    sigma, where = planning_noise(sc)
    if sc.design == "one-at-a-time":  # with --budgets, each arm at each budget: one family (compare.py)
        per = len(budgets.parse_budgets(sc.budgets)) if sc.budgets else 1
        m = (len(rows) - 1) * per
        what = f"{len(rows) - 1} arm(s) against the baseline, paired by seed" + (
            f", at {per} budgets each ({m} comparisons)" if per > 1 else "")
    else:
        m = len(design.fit([[2 * level - 1 for level in r] for r in rows], [0.0] * len(rows)).effects)
        what = f"{m} effects of {len(rows)} configurations"
    family = m if sc.correction != "none" else 1

    def achieved(s):
        if sc.design != "one-at-a-time":
            return design.effect_power(sc.effect, sigma, len(rows), s, family, m)
        return stats.paired_power(sc.effect, sigma, s, family)

    need = next(((s, p) for s in range(1, 1001) if (p := achieved(s)) is not None and p >= stats.POWER), None)
    lines = [f"power: a true effect of {sc.effect:g} at run-to-run std {sigma:.6f} ({where}); {what}, "
             f"{sc.correction} over {family}"]
    if need is None:
        raise UsageError(f"--effect={sc.effect:g} at std {sigma:g} needs more than 1000 seeds per configuration")
    lines.append(f"  {need[0]} seed(s) per configuration give {need[1]:.0%} power "
                 f"({need[0] * len(rows)} runs)")
    if sc.design != "one-at-a-time":
        lines.append(f"  standard error of an effect: 2 x std / sqrt(runs) = {2 * sigma / math.sqrt(need[0] * len(rows)):.6f}")
    seeds = sc.seeds if "seeds" in explicit else need[0]
    if "seeds" in explicit and sc.seeds < need[0]:
        p = achieved(sc.seeds)
        lines.append(f"  this plan's --seeds={sc.seeds} gives {p:.0%} power" if p is not None else
                     f"  this plan's --seeds={sc.seeds} leaves no df to measure the noise")
    return seeds, lines


def cost_lines(runs, sc):
    """GPU-hours and price of `runs` runs of the preset's length (with --budgets, a fraction: the
    runs' tokens over one run's)."""
    if not sc.hours_per_run:
        return []
    gpus = max(sc.torchrun, 1)
    hours = runs * sc.hours_per_run * gpus
    cost = f" = ${hours * sc.usd_per_hour:,.0f} at ${sc.usd_per_hour:g}/GPU-hour" if sc.usd_per_hour else ""
    what = f"{runs} runs" if isinstance(runs, int) else f"{runs:.2f} runs' tokens"
    return [f"cost: {what} x {sc.hours_per_run:g} h x {gpus} GPU(s) = {hours:,.1f} GPU-hours{cost}"]


def alias_report(X, k, gens=()):
    """Generators, defining relation, resolution and the aliases of main effects and 2FIs."""
    words, cells = design.defining_relation(design.np.array(X)), len(set(map(tuple, X)))
    if not words:
        return ("full factorial: every main effect and interaction is estimable on its own" if cells == 2 ** k
                else f"not a two-level factorial: {cells} of the {2 ** k} configurations")
    res = design.resolution(words)
    lines = [f"fractional 2^({k}-{k - round(math.log2(cells))}) design, resolution {design.roman(res)}"
             + (f", generators {', '.join(gens)}" if gens else ""), "defining relation: I = " + " = ".join(words),
             "aliases (each effect cannot be told apart from those after '='):"]
    for name in design.effect_names(k):
        lines.append(f"  {name} = " + " = ".join(design.aliases(name, words)))
    return "\n".join(lines)


def infer_factors(runs):
    """Factors from what varies between the runs: fields that move together form one factor."""
    keys = [k for k in runs[0].config if k not in IGNORED | REPLICATE]
    by_pattern = {}
    for k in keys:
        values = [r.config.get(k) for r in runs]
        distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        if len(distinct) > 1:
            pattern = tuple(distinct.index(v) for v in values)
            by_pattern.setdefault(pattern, {})[k] = distinct
    return [Factor(next(iter(levels)), levels) for levels in by_pattern.values()]


def analyze(patterns, factors, sc):
    runs = load_runs(patterns, sc.split)
    left_out = judged_lines(runs, sc.split)[1:]
    runs = [r for r in runs if r.loss is not None]
    if len(runs) < 2:
        raise UsageError(f"analyze needs at least two runs with a {sc.split} loss; {len(runs)} of "
                         f"{len(runs) + len(left_out)} have one" + (f" ({left_out[0]})" if left_out else ""))
    factors = factors or infer_factors(runs)
    X = []
    for r in runs:
        levels = [f.level_of(r.config) for f in factors]
        if None in levels or any(len(f.levels[f.name]) != 2 for f in factors):
            raise UsageError(f"{r.name}: not at one of two levels of every factor "
                             f"({', '.join(f.name for f in factors)})")
        X.append([2 * l - 1 for l in levels])
    k = len(factors)
    if k > len(design.LETTERS) or k == 0:
        raise UsageError(f"{k} factors: nothing to analyze")
    print(f"{len(runs)} runs, {len(set(map(tuple, X)))} distinct configurations")
    for line in judged_lines(runs, sc.split) + left_out:
        print(line)
    for j, f in enumerate(factors):
        print(f"  {design.LETTERS[j]}: {f.describe(0)}  ->  {f.describe(1)}")
    noise = given_noise(sc)
    fit = design.fit(X, [r.loss for r in runs], *(noise[:2] if noise else (0.0, 0)))
    print(alias_report(X, k))
    if fit.confounded:
        print("not estimable (confounded with a mix of fitted effects): " + ", ".join(fit.confounded))
    print(f"noise: {fit.noise}" + (f", std {fit.sigma:.6f}" if fit.sigma is not None else ""))
    tests = [stats.Comparison(e.estimate, None, None, None, "") if e.se is None else
             stats.t_comparison(e.estimate, e.se, fit.df, "t") for e in fit.effects]
    stats.adjust(tests, sc.correction)
    rows = []
    for e, c in zip(fit.effects, tests):
        what = " x ".join(factors[design.LETTERS.index(ch)].name for ch in e.name)
        se = f"{e.se:.6f}" if e.se is not None else "n/a"
        ci = f"[{c.low:+.6f}, {c.high:+.6f}]" if c.low is not None else "n/a"
        p = (stats.format_p(c.p), stats.format_p(c.p_adjusted))
        rows.append([e.name, what, f"{e.estimate:+.6f}", se, ci, *p, c.verdict, ", ".join(e.aliases) or "-"])
    print(table(["effect", "factors", "estimate", "SE", "95% interval", "p", f"p ({sc.correction})", "verdict",
                 "aliased with"], rows, False))
    print("(an effect is the mean loss at the second level minus at the first; negative helps; verdicts "
          f"corrected ({sc.correction}) over the {sum(c.p is not None for c in tests)} effects)")
    x = design.best(fit, k)
    mean, half = design.predict(fit, x)
    combo = "; ".join(f.describe((v + 1) // 2) for f, v in zip(factors, x))
    interval = f" +- {half:.6f} (95%)" if half is not None else " (no interval: no noise estimate)"
    print(f"predicted best: {combo}\n  predicted loss {mean:.6f}{interval}")
    return fit


def main(argv):
    specs, rest = split_factors(argv)
    (sc,), positionals, explicit = parse_config(rest, [SweepConfig], "sweep.py", USAGE, max_positionals=10 ** 6)
    if not positionals or positionals[0] not in ("plan", "analyze", "ladder"):
        raise UsageError(f"usage: sweep.py {USAGE}")
    factors = [parse_factor(s) for s in specs]
    fields = [k for f in factors for k in f.levels]
    twice = sorted({k for k in fields if fields.count(k) > 1})
    if twice:  # each run sets every factor's level: the later factor's would silently undo the earlier's
        raise UsageError(f"{', '.join(twice)} in more than one --factor; give a field one factor with every level "
                         f"it takes, e.g. --factor {twice[0]}=A,B,C (one-at-a-time designs take more than two)")
    if positionals[0] == "ladder":
        return ladder.main(factors, sc, positionals[1:], argv, explicit, plan, Factor, run_label)
    if positionals[0] == "plan":
        if not factors or len(positionals) > 1:
            raise UsageError("plan takes --factor FIELD=A,B (at least one) and no other arguments")
        if sc.seeds < 1 or sc.torchrun < 0:
            raise UsageError("--seeds must be >= 1 and --torchrun >= 0")
        for name in ("effect", "hours_per_run", "usd_per_hour", "noise_std"):
            value = getattr(sc, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name} must be a finite number, 0 or more, got {value}")
        return plan(factors, sc, argv, explicit)
    if len(positionals) < 2:
        raise UsageError("analyze takes run directories or globs, e.g. 'out/sweep-*'")
    return analyze(positionals[1:], factors, sc)


if __name__ == "__main__":
    run_main(main)
