"""The verdict table: every replicate group against the baseline group, corrected as a family.

compare.py calls `judge` on runs it trained or imported, and tests/test_verdicts.py on thousands
of simulated tables, so the simulation proves the code path that real verdicts take.
"""

import math
from dataclasses import dataclass

import numpy as np

from gpt_interventions.results import FinishedRun, group_runs
from gpt_interventions.stats import adjust, compare, detectable, summary, zero_spread

REPLICATE_KEY = ("seed", "data_seed")


@dataclass
class Verdict:
    """One group's row: its losses' summary and, but for the baseline, its comparison."""
    group: object              # results.Group
    mean: float
    std: float | None
    n: int
    comparison: object = None  # stats.Comparison; None for the baseline
    detectable: float | None = None  # smallest true difference found with 80% power, as corrected
    budget: int | None = None  # training tokens of the runs, when the table holds several budgets


def seed_keyed(group):
    """{(seed, data_seed): loss} when each of the group's runs has its own seeds, else None."""
    keyed = {tuple(r.config.get(k) for k in REPLICATE_KEY): r.loss for r in group.runs if r.loss is not None}
    return keyed if len(keyed) == len(group.losses) else None


def aligned(group, base):
    """(a, b, paired): the two groups' losses, seed by seed when they hold the same seeds."""
    ka, kb = seed_keyed(group), seed_keyed(base)
    if ka is not None and kb is not None and set(ka) == set(kb) and len(ka) >= 2:
        keys = sorted(ka, key=str)
        return [ka[k] for k in keys], [kb[k] for k in keys], True
    return group.losses, base.losses, False


def judge(groups, noise=None, correction="holm", sensitivity=True, test="auto", higher_is_better=False):
    """Verdicts of groups[1:] against groups[0] (the baseline), Holm-corrected by default.

    noise = (std, n or None, name): the run-to-run std that judges a group with a single run (n:
    the runs it was measured on; None: a given, known std). sensitivity: also find each row's
    smallest detectable difference (a root search; the simulations skip it, it decides nothing).
    The groups' values are test losses, or accuracies with higher_is_better (the deltas and tests
    are the same; only which sign is `better` turns)."""
    return judge_budgets([(None, groups, noise)], correction, sensitivity, test, higher_is_better)


def judge_budgets(parts, correction="holm", sensitivity=True, test="auto", higher_is_better=False):
    """judge() of each token budget's groups against that budget's baseline group, the verdicts of
    every budget corrected as one family. parts: [(budget, groups, noise)]; each row keeps its budget."""
    rows = []
    for budget, groups, noise in parts:
        base = groups[0]
        if not base.losses:  # every other row would read as a baseline: the caller refuses or says so first
            raise ValueError("judge: the baseline group has no values to judge against")
        for g in groups:
            if not g.losses:
                continue
            row = Verdict(g, *summary(g.losses), budget=budget)
            if g is not base:
                a, b, pairs = aligned(g, base)
                row.comparison = compare(a, b, noise, pairs, test)
                row.comparison.higher_is_better = higher_is_better
            rows.append(row)
    comparisons = [r.comparison for r in rows if r.comparison is not None]
    adjust(comparisons, correction)
    m = sum(c.p is not None for c in comparisons)
    for r in rows if sensitivity else ():
        c = r.comparison
        if c is not None and c.se:
            r.detectable = detectable(c.se, c.df, m if correction != "none" else 1)
    return rows


def pooled(samples):
    """(std, df) pooled over samples (each a list of values around its own mean); None without df.
    A spread that is float rounding of identical values is reported as 0."""
    samples = [np.asarray(x, dtype=np.float64) for x in samples if len(x) >= 2]
    df = sum(len(x) - 1 for x in samples)
    if not df:
        return None
    std = math.sqrt(sum(float(np.sum((x - x.mean()) ** 2)) for x in samples) / df)
    return (0.0 if zero_spread(std, *samples) else std), df


def noise_sources(groups):
    """The run-to-run std by where it comes from, pooled over the groups where it can be seen:
    repeats (identical configs and seeds: only the hardware differs), seeds (other seeds: their
    weights and dropout, plus any hardware noise) and data order (data_seed). {kind: (std, df)}
    for the kinds with replicates."""
    out = {}
    for kind, same, varies in (("repeats", REPLICATE_KEY, None), ("seeds", ("data_seed",), "seed"),
                               ("data order", ("seed",), "data_seed")):
        samples = []
        for g in groups:
            cells = {}
            for r in g.runs:
                if r.loss is not None:
                    cells.setdefault(tuple(r.config.get(k) for k in same), {}).setdefault(
                        None if varies is None else r.config.get(varies), []).append(r.loss)
            for by in cells.values():
                # repeats: every run of the cell; the others: one value (its mean) per seed or order
                samples.append(next(iter(by.values())) if varies is None else [float(np.mean(v)) for v in by.values()])
        found = pooled(samples)
        if found is not None:
            out[kind] = found
    return out


def pooled_std(groups):
    """(std, df) pooled over the replicate groups: these runs' noise, whatever its source; or None."""
    return pooled([g.losses for g in groups])


def simulate(tables, arms, n, effects, sigma, seed_sd, paired, correction="holm", seed=0, test="auto"):
    """Comparisons of `tables` synthetic tables, through judge() as compare.py's tables go: a
    baseline and `arms` arms of n runs, arm j's true effect effects[j - 1], run-to-run noise sigma.
    Runs share seeds across arms when paired (a seed's own effect, of std seed_sd, moves all its
    runs alike), else every run has its own seed. tests/test_verdicts.py and
    benchmarks/simulate_verdicts.py check what the verdicts promise on them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(tables):
        shared = rng.normal(0, seed_sd, n)  # a seed's effect, the same in every arm that has the seed
        runs = []
        for j in range(arms + 1):
            true = 3.7 + (effects[j - 1] if j else 0.0)
            for i in range(n):
                s, seed_effect = (i, shared[i]) if paired else (1000 * j + i, rng.normal(0, seed_sd))
                config = {"seed": s, "data_seed": 0, "arm": j}
                runs.append(FinishedRun(f"a{j}s{i}", "", config, [], true + seed_effect + rng.normal(0, sigma),
                                        "simulated", None, 1))
        rows = judge(group_runs(runs, runs[0]), correction=correction, sensitivity=False, test=test)
        out.append([r.comparison for r in rows[1:]])
    return out
