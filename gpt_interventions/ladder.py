"""A ladder of small models: each arm trained at a few sizes, its loss fitted against compute, and
the fit carried up to the target size (sweep.py ladder).

The sizes follow one rule from the target's shape: n_layer from --rungs, the target's width per
layer (768 / 12 = 64 for the story's 163M) and its head size, so n_embd = n_layer x width per
layer (a multiple of the head size) and n_head = n_embd / head size; each rung trains
tokens_per_param x its parameters (the target's ratio by default: the story's 3.26B tokens over
163M parameters is 20, Chinchilla's). Under parametrization=mup with the target's width as
mup_base_width the target itself is computed exactly as the standard model (64-wide heads), and
each smaller rung gets the lr that muP carries down from it (tests/test_mup.py).

The fit (OLMo-core's shared floor, arXiv 2412.04403): L = E + A_arm x (C / C_target)^-alpha_arm,
one E for every arm, least squares over each (arm, rung) mean. At the target C / C_target = 1, so
an arm's predicted loss there is E + A_arm. The residuals are tested against the seeds' scatter
(lack_of_fit), and finished target-scale runs are set against the predictions (backtest_lines).
"""

import math
import shlex
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares
from scipy.stats import f as f_dist

from gpt_interventions.errors import UsageError
from gpt_interventions.stats import t_quantile

SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "max_tokens", "max_iters")
CAVEATS = [
    "caveats:",
    "  - an extrapolation: the fit is checked only where the rungs are (the residuals above); the target is "
    "beyond them, and the interval covers the seeds' noise, not a wrong functional form",
    "  - DataDecide (arXiv 2504.11393): one small scale ranks two configurations as the large scale does only "
    "about 80% of the time; settings tuned at nanochat's d12 hurt at d20",
    "  - an intervention whose effect changes sign with scale (a regulariser that helps small models) can bend "
    "its arm's curve between the rungs and the target where no rung sees it",
    "  - without muP (parametrization=standard) each rung's learning rate is mis-tuned by a different amount, "
    "and that confounds the ladder",
]


def rung_shape(mc, n_layer):
    """{n_layer, n_embd, n_head} of a rung of `n_layer` blocks under the width rule of the target `mc`."""
    head = mc.n_embd // mc.n_head
    n_embd = max(head, round(n_layer * mc.n_embd / mc.n_layer / head) * head)
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // head}


SIZES = {}  # (parameters, FLOPs per token) of each config seen: an analysis meets each rung many times


def size_of(mc):
    """(parameters, training FLOPs per token) of a model config, built on the meta device (no memory)."""
    from model import GPT
    key = repr(mc)
    if key not in SIZES:
        with torch.device("meta"):
            model = GPT(mc)
        SIZES[key] = model.num_params(), model.flops_per_token()
    return SIZES[key]


def trained_tokens(c):
    """Tokens a run of config fields `c` (a dict) trains: max_iters steps of total_batch_size (or of one
    micro-batch of one rank) when max_iters is set, else max_tokens (train.py rounds it up to whole
    steps: at most one step more)."""
    if c["max_iters"]:
        return c["max_iters"] * (c["total_batch_size"] or c["batch_size"] * c["block_size"])
    return c["max_tokens"]


def tokens_per_param(mc, tc, given):
    """The ladder's tokens per parameter: `given`, or the target's (its tokens over its parameters)."""
    return given or trained_tokens({**mc.__dict__, **tc.__dict__}) / size_of(mc)[0]


@dataclass
class Fit:
    E: float
    A: list       # per arm: the excess over E at the target's compute
    alpha: list   # per arm
    residuals: list  # (arm, x, mean loss, fitted) of each (arm, rung) mean

    def predict(self, arm, x=1.0):
        return self.E + self.A[arm] * x ** -self.alpha[arm]


def fit(points, arms, start=None):
    """Least squares of L = E + A_a x^-alpha_a over points [(arm, x, loss)], E shared, 0 < E < min(loss)
    and 0 < alpha < 3. x is compute over the target's. Each (arm, x) enters by its mean."""
    cells = {}
    for a, x, loss in points:
        cells.setdefault((a, x), []).append(loss)
    keys = sorted(cells)
    arm = np.array([a for a, _ in keys])
    x = np.array([x for _, x in keys])
    y = np.array([np.mean(cells[k]) for k in keys])
    if any((arm == a).sum() < 2 for a in range(arms)):
        raise UsageError("every arm needs at least two rungs with a loss to fit its curve")
    top = float(y.min())

    def residual(p):  # p = [E, log A_0, alpha_0, log A_1, alpha_1, ...]
        return p[0] + np.exp(p[1::2][arm]) * x ** -p[2::2][arm] - y

    if start is None:
        start = [0.5 * top] + [math.log(max(1e-3, float(np.mean(y[arm == a])) - 0.5 * top)), 0.3] * arms
    lower = [0.0] + [-30.0, 1e-4] * arms
    upper = [top] + [30.0, 3.0] * arms
    p = least_squares(residual, np.clip(start, np.add(lower, 1e-9), np.subtract(upper, 1e-9)),
                      bounds=(lower, upper), x_scale="jac").x
    fitted = residual(p) + y
    return Fit(float(p[0]), [float(math.exp(v)) for v in p[1::2]], [float(v) for v in p[2::2]],
               [(int(a), float(xx), float(yy), float(f)) for a, xx, yy, f in zip(arm, x, y, fitted)]), p


def refit(arm, x, Y, p0, upper_E, iters=60):
    """Batched Levenberg-Marquardt from p0 for B resampled sets of cell means Y (B, cells) at once
    (one least_squares call per draw costs about 10 ms; this, well under 1 ms a draw) -> (B, params)."""
    B, n = Y.shape
    P, lx, rows = len(p0), np.log(x), np.arange(len(x))
    lower = np.array([0.0] + [-30.0, 1e-4] * (P // 2))
    upper = np.stack([upper_E] + [np.full(B, v) for v in [30.0, 3.0] * (P // 2)], axis=1)

    def residual(p):
        t = np.exp(p[:, 1::2][:, arm] - p[:, 2::2][:, arm] * lx)  # A x^-alpha, (B, cells)
        J = np.zeros((B, n, P))
        J[:, :, 0] = 1.0
        J[:, rows, 1 + 2 * arm], J[:, rows, 2 + 2 * arm] = t, -t * lx
        return p[:, :1] + t - Y, J

    p = np.clip(np.tile(p0, (B, 1)), lower, upper)
    r, J = residual(p)
    cost, damping = (r ** 2).sum(1), np.full(B, 1e-3)
    for _ in range(iters):
        H = np.einsum("bnp,bnq->bpq", J, J)
        g = np.einsum("bnp,bn->bp", J, r)
        H = H + damping[:, None, None] * (np.eye(P) * (np.diagonal(H, axis1=1, axis2=2)[:, :, None] + 1e-12))
        trial = np.clip(p - np.linalg.solve(H, g[:, :, None])[:, :, 0], lower, upper)
        r2, J2 = residual(trial)
        cost2 = (r2 ** 2).sum(1)
        better = cost2 < cost
        p, r, J = np.where(better[:, None], trial, p), np.where(better[:, None], r2, r), \
            np.where(better[:, None, None], J2, J)
        cost, damping = np.where(better, cost2, cost), np.where(better, damping / 3, damping * 4)
    return p


def bootstrap(points, arms, draws=1000, seed=0, level=0.95):
    """Point fit and bootstrap intervals over seeds: each draw resamples the seeds (a seed keeps its run
    at every rung and arm, so arms trained on the same seeds stay paired) and refits. The interval is
    the estimate +- t(level, seeds - 1) x the draws' std x sqrt(n / (n - 1)): the bootstrap's spread
    with a small-sample widening: at 3 seeds the draws' std with the normal 1.96 covers only about 82%
    (tests/test_sweep_ladder.py's simulation; the plug-in variance is (n-1)/n of the sample's).
    points: [(arm, x, loss, seed)].
    Returns (Fit, {arm: (estimate, low, high)}, {arm: (est, low, high) of arm - arm 0})."""
    seeds = sorted({s for *_, s in points})
    n = len(seeds)
    if n < 2:
        raise UsageError(f"a bootstrap over seeds needs at least two seeds; the ladder has {n}")
    best, p0 = fit([pt[:3] for pt in points], arms)
    cells = sorted({(a, x) for a, x, *_ in points})
    table = np.full((len(cells), n), np.nan)  # loss of each cell (arm, x) at each seed
    for a, x, loss, s in points:
        table[cells.index((a, x)), seeds.index(s)] = loss
    counts = np.random.default_rng(seed).multinomial(n, [1 / n] * n, size=draws)  # (draws, seeds)
    present = ~np.isnan(table)
    weight = counts @ present.T  # (draws, cells): how many resampled runs each cell holds
    with np.errstate(invalid="ignore", divide="ignore"):
        Y = (counts @ np.where(present, table, 0.0).T) / weight
    Y = Y[(weight > 0).all(1)]
    arm = np.array([a for a, _ in cells])
    p = refit(arm, np.array([x for _, x in cells]), Y, p0, Y.min(1))
    stats = p[:, 0:1] + np.exp(p[:, 1::2])  # each arm's prediction at x = 1, (draws, arms)
    q = t_quantile(1 - (1 - level) / 2, n - 1)
    est = [best.predict(a) for a in range(arms)]

    def interval(value, column):
        half = q * float(np.std(column, ddof=1)) * math.sqrt(n / (n - 1))
        return value, value - half, value + half

    losses = {a: interval(est[a], stats[:, a]) for a in range(arms)}
    diffs = {a: interval(est[a] - est[0], stats[:, a] - stats[:, 0]) for a in range(1, arms)}
    return best, losses, diffs


def lack_of_fit(points, fit_):
    """The classical lack-of-fit F test of replicated cells: do the curves miss the (arm, rung) means by
    more than the seeds scatter around them? points: [(arm, x, loss, seed)]. Returns (F, df of the lack
    of fit, df of the seeds' scatter, p), or None when the fit leaves no degree of freedom. Runs of one
    seed share its data order across cells, so the cells are not quite independent: a rough check."""
    cells = {}
    for a, x, loss, _ in points:
        cells.setdefault((a, x), []).append(loss)
    fitted = {(a, x): f for a, x, _, f in fit_.residuals}
    df_lack = len(cells) - (1 + 2 * len(fit_.A))
    df_pure = sum(len(v) - 1 for v in cells.values())
    if df_lack < 1 or df_pure < 1:
        return None
    ss_lack = sum(len(v) * (np.mean(v) - fitted[k]) ** 2 for k, v in cells.items())
    ss_pure = sum(float(((np.asarray(v) - np.mean(v)) ** 2).sum()) for v in cells.values())
    F = float(ss_lack / df_lack / (ss_pure / df_pure)) if ss_pure > 0 else math.inf
    return F, df_lack, df_pure, float(f_dist.sf(F, df_lack, df_pure))


def lack_of_fit_line(points, fit_):
    test = lack_of_fit(points, fit_)
    if test is None:
        return (f"lack of fit: not checked: the fit has {1 + 2 * len(fit_.A)} parameters for as many rung means "
                "(or no rung has two seeds); one more rung gives it a degree of freedom")
    F, df_lack, df_pure, p = test
    head = f"lack of fit: F({df_lack}, {df_pure}) = {F:.3g}, p = {p:.2g}: "
    if p < 0.05:
        return head + ("the curves miss the rung means by more than the seeds scatter around them. The form "
                       "L = E + A x C^-alpha does not hold across these rungs, and the intervals below, which "
                       "hold only the seeds' noise, understate the prediction's error")
    return head + (f"the curves miss the rung means by no more than the seeds scatter around them (checked only "
                   f"where the rungs are, on {df_lack} degree(s) of freedom: more rungs make the check stronger)")


def backtest_lines(targets, names, losses, diffs):
    """How the ladder's predictions at the target met finished target-scale runs: {arm: [losses]};
    losses and diffs: bootstrap()'s (estimate, low, high) of each arm and of each arm - arm 0."""
    if not targets:
        return ["backtest: no finished target-scale runs (add the target's n_layer to --rungs to have some)"]

    def met(predicted, measured, sign=""):
        est, low, high = predicted
        where = "inside" if low <= measured <= high else "OUTSIDE"
        return (f"predicted {est:{sign}.4f}, measured {measured:{sign}.4f}, error {est - measured:+.4f}, "
                f"{where} the 95% interval")

    lines = ["backtest against the finished target-scale runs (not in the fit):"]
    for a, runs in sorted(targets.items()):
        lines.append(f"  {names[a]} over {len(runs)} run(s): " + met(losses[a], float(np.mean(runs))))
    for a in sorted(targets):
        if a and 0 in targets:
            measured = float(np.mean(targets[a]) - np.mean(targets[0]))
            lines.append(f"  {names[a]} - {names[0]}: " + met(diffs[a], measured, "+"))
    if any("OUTSIDE" in line for line in lines):
        lines.append("  a measurement outside its interval: the ladder's error here is larger than its interval says "
                     "(the interval holds the seeds' noise, not a wrong curve); trust its next predictions less")
    return lines


def target_of(sc):
    """(GPTConfig, TrainConfig) of the target: --preset, else the defaults (the story's 163M run)."""
    from gpt_interventions.cli import parse_config
    from gpt_interventions.training import TrainConfig
    from model import GPTConfig
    return parse_config([sc.preset] if sc.preset else [], [GPTConfig, TrainConfig], "train.py", "")[0]


def main(factors, sc, positionals, argv, explicit, plan, Factor, run_label):
    """sweep.py ladder: plan the runs (plan, Factor and run_label are sweep.py's), or with --analyze fit them."""
    if len(factors) != 1:
        raise UsageError("ladder takes one --factor: its levels are the arms, the first the baseline "
                         "(fields that move together go in one factor)")
    arms = factors[0]
    if set(arms.levels) & set(SIZE_FIELDS + ("parametrization", "mup_base_width")):
        raise UsageError(f"--factor {arms.name}: the ladder sets {', '.join(SIZE_FIELDS)} and the parametrization "
                         "itself; an arm cannot change them")
    mc, tc = target_of(sc)
    if sc.analyze:
        if not positionals:
            raise UsageError("ladder --analyze takes run directories or globs, e.g. 'out/ladder-*'")
        return analyze(positionals, arms, sc, mc, tc)
    if positionals:
        raise UsageError("ladder plans from --factor and takes no run directories; to fit finished runs add --analyze")
    try:
        layers = sorted({int(v) for v in sc.rungs.split(",")})
    except ValueError:
        raise UsageError(f"--rungs={sc.rungs}: expected n_layer values such as 2,4,6") from None
    if len([n for n in layers if n < mc.n_layer]) < 3 or layers[0] < 1 or sc.seeds < 2:
        raise UsageError(f"a ladder needs at least three rungs below the target's n_layer {mc.n_layer} (got "
                         f"--rungs={sc.rungs}) and --seeds of 2 or more for its interval (got {sc.seeds})")
    tpp = tokens_per_param(mc, tc, sc.tokens_per_param)
    levels, sizes = {k: [] for k in SIZE_FIELDS}, []
    for n_layer in layers:
        shape = rung_shape(mc, n_layer)
        params, per_token = size_of(type(mc)(**{**mc.__dict__, **shape}))
        for k, v in {**shape, "max_tokens": round(tpp * params), "max_iters": 0}.items():
            levels[k].append(v)
        sizes.append((shape, params, per_token * round(tpp * params)))
    if sc.mup:
        levels.update(parametrization=["mup"] * len(layers), mup_base_width=[mc.n_embd] * len(layers))
    spec = " ".join(f"{k}={','.join(map(str, v))}" for k, v in arms.levels.items())
    preset = f" --preset={shlex.quote(sc.preset)}" * bool(sc.preset)

    def tail(python, out_root, names):
        from gpt_interventions import ROOT
        q = shlex.quote
        return [f"{python} {q(ROOT + '/sweep.py')} ladder --analyze {q(out_root + '-*')} --factor {q(spec)}"
                f"{preset} --split={sc.split}"]

    rows = [[i, j] for j in range(len(next(iter(arms.levels.values())))) for i in range(len(layers))]
    def label(factors, row):  # every run names its rung: n_layer2, n_layer2_qkv_biasTrue
        return f"n_layer{layers[row[0]]}" + (f"_{run_label([arms], row[1:])}" if row[1] else "")

    names = plan([Factor("n_layer", levels), arms], sc, argv, explicit, rows, tail, label)
    target_c = size_of(mc)[1] * trained_tokens({**mc.__dict__, **tc.__dict__})
    print(f"rungs ({tpp:g} tokens per parameter; compute as a fraction of the target's "
          f"{target_c:.3g} FLOPs, per arm and seed):")
    for shape, params, c in sizes:
        print(f"  n_layer {shape['n_layer']:>2}, n_embd {shape['n_embd']:>4}, n_head {shape['n_head']:>2}: "
              f"{params / 1e6:7.1f}M parameters, {c / target_c:8.2%}")
    below = sum(c for (shape, _, c) in sizes if shape["n_layer"] < mc.n_layer)
    print(f"  the fitted rungs cost {below / target_c:.1%} of one target run per arm and seed"
          + ("" if sc.mup else "; --mup=False: each rung's lr is the target's, mis-tuned by width"))
    return names


def analyze(patterns, arms, sc, mc, tc):
    from gpt_interventions.results import judged_lines, load_runs
    from model import GPTConfig
    runs = load_runs(patterns, sc.split)
    left_out = judged_lines(runs, sc.split)[1:]
    target_c = size_of(mc)[1] * trained_tokens({**mc.__dict__, **tc.__dict__})
    fields = GPTConfig.__dataclass_fields__
    n_arms = len(next(iter(arms.levels.values())))
    names = [arms.describe(a) for a in range(n_arms)]
    points, targets, parametrizations = [], {}, set()
    for r in runs:
        if r.loss is None:
            continue
        arm = arms.level_of(r.config)
        if arm is None:
            raise UsageError(f"{r.name}: at none of the arms' levels ({arms.name})")
        rmc = GPTConfig(**{k: v for k, v in r.config.items() if k in fields})
        parametrizations.add(rmc.parametrization)
        if (rmc.n_layer, rmc.n_embd) == (mc.n_layer, mc.n_embd):
            targets.setdefault(arm, []).append(r.loss)
        else:
            points.append((arm, size_of(rmc)[1] * trained_tokens(r.config) / target_c, r.loss, r.config["seed"]))
    print(f"{len(points)} ladder runs, {sum(map(len, targets.values()))} target-scale runs; "
          f"target: n_layer {mc.n_layer}, n_embd {mc.n_embd}, "
          f"{trained_tokens({**mc.__dict__, **tc.__dict__}):,} tokens ({target_c:.3g} FLOPs)")
    for line in left_out:
        print(line)
    best, losses, diffs = bootstrap(points, n_arms, sc.bootstrap)
    print(f"fit: L = E + A x (C / C_target)^-alpha, E = {best.E:.4f} shared")
    for a in range(n_arms):
        print(f"  {names[a]}: A = {best.A[a]:.4f}, alpha = {best.alpha[a]:.4f}")
    print("residuals (the mean loss of each arm and rung, minus the fit):")
    for a, x, y, f in best.residuals:
        print(f"  {names[a]} at C/C_target = {x:.4g}: {y:.4f} - {f:.4f} = {y - f:+.4f}")
    print(lack_of_fit_line(points, best))
    seeds = len({p[3] for p in points})
    print(f"predicted at the target (95% intervals, bootstrap over {seeds} seeds):")
    for a, (est, low, high) in losses.items():
        print(f"  {names[a]}: {est:.4f} [{low:.4f}, {high:.4f}]")
    for a, (est, low, high) in diffs.items():
        verdict = "excludes zero" if low > 0 or high < 0 else "includes zero: no difference shown"
        print(f"  {names[a]} - {names[0]}: {est:+.4f} [{low:+.4f}, {high:+.4f}], {verdict}")
    for line in backtest_lines(targets, names, losses, diffs) + CAVEATS:
        print(line)
    if "standard" in parametrizations:
        print("  (these runs include parametrization=standard ones: the lr caveat applies to them)")
    return best, losses, diffs
