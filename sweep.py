"""Plan intervention experiments, then estimate their effects from the finished runs.

    python sweep.py plan --factor grad_clip=0,3.5 --factor qkv_bias=False,True ... \\
        [--preset=config/tiny.toml] [--design=one-at-a-time|full|fractional] [--seeds=N] [--out=DIR]
    sh DIR/run.sh                       # trains and evaluates every run, then compares them
    python sweep.py analyze out/NAME-* [--factor ...]

A factor is `field=low,high`; the first level is the baseline's. Fields that move together form
one factor: --factor 'learning_rate=0.0004,0.0014 lr_schedule=constant,cosine'.
"""

import math
import os
import shlex
from dataclasses import asdict, dataclass

from gpt_interventions import design
from gpt_interventions.cli import field, load_preset, parse_config
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.results import IGNORED, REPLICATE, load_runs
from gpt_interventions.stats import t_quantile
from gpt_interventions.tables import fmt, table
from gpt_interventions.training import TrainConfig
from model import GPTConfig

USAGE = "plan --factor FIELD=A,B ... [--key=value ...] | analyze RUN_DIR_OR_GLOB... [--factor ...]"


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
    noise_sd: float = field(0.0, "analyze: run-to-run std when the runs hold no replicates (compare.py's std)")
    noise_n: int = field(0, "analyze: how many runs noise_sd was measured on")


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


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, (int, float)) else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan(factors, sc, argv):
    rows, gens = plan_rows(factors, sc)
    base = load_preset(sc.preset) if sc.preset else {}
    base_args = [sc.preset] if sc.preset else []
    prefix = os.path.basename(os.path.normpath(sc.out))
    os.makedirs(sc.out, exist_ok=True)
    launch = f"torchrun --standalone --nproc_per_node={sc.torchrun} " if sc.torchrun else "python "
    script = ["#!/usr/bin/env bash", f"# {len(rows) * sc.seeds} runs, written by: python sweep.py "
              + " ".join(map(shlex.quote, argv)),
              "# Run from the repository root. A run with a test result already is skipped, so the",
              "# script can be run again after a failure.", "set -euo pipefail"]
    names = []
    for i, row in enumerate(rows):
        flags = [f"--{k}={v[lvl]}" for f, lvl in zip(factors, row) for k, v in f.levels.items()]
        mc, tc = resolve(base_args + flags)
        for s in range(sc.seeds):
            name = f"{prefix}-{i:02d}-{run_label(factors, row)}" + (f"-s{tc.seed + s}" if sc.seeds > 1 else "")
            values = {**asdict(mc), **asdict(tc), "seed": tc.seed + s, "run_name": name}
            keys = [k for k in base if k not in ("run_name", "out_dir")] + [k for f in factors for k in f.levels]
            keys += ["seed"] * (sc.seeds > 1) + ["run_name"]
            path = os.path.join(sc.out, f"{name}.toml")
            with open(path, "w") as fh:
                fh.write(f"# {sc.design} sweep {prefix}, run {i}: {', '.join(f.describe(l) for f, l in zip(factors, row))}\n")
                fh.write("".join(f"{k} = {toml_value(values[k])}\n" for k in dict.fromkeys(keys)))
            run_dir = os.path.join("out", name)  # train.py's default: the preset sets no out_dir
            evals = f" --eval_tokens={sc.test_tokens}" if sc.test_tokens else ""
            script.append(f"[ -f {run_dir}/eval.json ] || {{ {launch}train.py {path} && {launch}eval.py {run_dir} "
                          f"--dataset={tc.dataset} --data_dir={tc.data_dir}{evals}; }}")
            names.append(name)
    out_root = os.path.join("out", prefix)
    factor_args = " ".join(f"--factor {shlex.quote(' '.join(f'{k}={chr(44).join(map(str, v))}' for k, v in f.levels.items()))}"
                           for f in factors)
    if any(rows[0]):  # the principal fraction of an odd k leaves the all-first-levels run out
        script.append("# the baseline configuration is not in this fraction: compare.py takes the first run as its baseline")
    script.append(f"python compare.py '{out_root}-*' --baseline={names[0]} --charts={sc.out}/charts")
    if sc.design != "one-at-a-time":
        script.append(f"python sweep.py analyze '{out_root}-*' {factor_args}")
    with open(os.path.join(sc.out, "run.sh"), "w") as fh:
        fh.write("\n".join(script) + "\n")
    os.chmod(os.path.join(sc.out, "run.sh"), 0o755)
    print(f"{sc.design} design, {len(rows)} configurations x {sc.seeds} seed(s) = {len(names)} runs")
    for j, f in enumerate(factors):
        print(f"  {design.LETTERS[j]}: {f.describe(0)}  ->  {f.describe(1) if len(f.levels[f.name]) == 2 else '...'}")
    if gens is not None:
        print(alias_report([[2 * l - 1 for l in r] for r in rows], len(factors), gens))
    print(f"wrote {len(names)} presets and {os.path.join(sc.out, 'run.sh')}; run it with: sh {sc.out}/run.sh")
    return names


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
    runs = [r for r in load_runs(patterns) if r.loss is not None]
    if len(runs) < 2:
        raise UsageError("analyze needs at least two runs with a test (or validation) loss")
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
    sources = {r.source for r in runs}
    print(f"{len(runs)} runs, {len(set(map(tuple, X)))} distinct configurations, losses: {'/'.join(sorted(sources))}")
    for j, f in enumerate(factors):
        print(f"  {design.LETTERS[j]}: {f.describe(0)}  ->  {f.describe(1)}")
    fit = design.fit(X, [r.loss for r in runs], sc.noise_sd, sc.noise_n)
    print(alias_report(X, k))
    if fit.confounded:
        print("not estimable (confounded with a mix of fitted effects): " + ", ".join(fit.confounded))
    print(f"noise: {fit.noise}" + (f", std {fit.sigma:.6f}" if fit.sigma is not None else ""))
    q = t_quantile(0.975, fit.df) if fit.df else None
    rows = []
    for e in fit.effects:
        what = " x ".join(factors[design.LETTERS.index(c)].name for c in e.name)
        se = f"{e.se:.6f}" if e.se is not None else "n/a"
        ci = f"[{e.estimate - q * e.se:+.6f}, {e.estimate + q * e.se:+.6f}]" if e.se is not None else "n/a"
        rows.append([e.name, what, f"{e.estimate:+.6f}", se, ci, ", ".join(e.aliases) or "-"])
    print(table(["effect", "factors", "estimate", "SE", "95% interval", "aliased with"], rows, False))
    print("(an effect is the mean loss at the second level minus at the first; negative helps)")
    x = design.best(fit, k)
    mean, half = design.predict(fit, x)
    combo = "; ".join(f.describe((v + 1) // 2) for f, v in zip(factors, x))
    interval = f" +- {half:.6f} (95%)" if half is not None else " (no interval: no noise estimate)"
    print(f"predicted best: {combo}\n  predicted loss {mean:.6f}{interval}")
    return fit


def main(argv):
    specs, rest = split_factors(argv)
    (sc,), positionals, _ = parse_config(rest, [SweepConfig], "sweep.py", USAGE, max_positionals=10 ** 6)
    if not positionals or positionals[0] not in ("plan", "analyze"):
        raise UsageError(f"usage: sweep.py {USAGE}")
    factors = [parse_factor(s) for s in specs]
    if positionals[0] == "plan":
        if not factors or len(positionals) > 1:
            raise UsageError("plan takes --factor FIELD=A,B (at least one) and no other arguments")
        if sc.seeds < 1 or sc.torchrun < 0:
            raise UsageError("--seeds must be >= 1 and --torchrun >= 0")
        return plan(factors, sc, argv)
    if len(positionals) < 2:
        raise UsageError("analyze takes run directories or globs, e.g. 'out/sweep-*'")
    return analyze(positionals[1:], factors, sc)


if __name__ == "__main__":
    run_main(main)
