"""Comparing groups of runs: intervals, p-values, verdicts, multiplicity, power. scipy does the
distributions, tests and bootstrap; this module chooses the test that the sample sizes allow.

A comparison is mean(a) - mean(b) of test losses (negative: a is better; of accuracies, positive) with a 95% interval and
a two-sided p-value. Its verdict reads the p-value after the table's family-wise correction
(Holm by default), so a table of ten comparisons keeps its chance of any false verdict at 5%.
"""

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sp

# A percentile bootstrap is on request only: with the runs a side a study can pay for it resamples
# too few distinct values and its interval comes out narrower than the truth (measured coverage of
# its 95% intervals: 0.909 at 10 runs a side, 0.930 at 20, 0.935 at 30; BENCHMARKS.md), while
# Welch's t is exact for normal noise at any n.
BOOTSTRAP_RESAMPLES = 10_000
LEVEL = 0.95
ALPHA = 1 - LEVEL
POWER = 0.8
CORRECTIONS = ("holm", "bonferroni", "none")
# a spread this small is float rounding of identical numbers (a deterministic machine's repeats),
# not noise: it gives no noise estimate rather than an infinitely significant difference
ZERO_SPREAD = 1e-9


def t_quantile(p, df):
    """The t with P(T <= t) = p for Student's t with df degrees of freedom (inf: the normal)."""
    return float(sp.norm.ppf(p) if math.isinf(df) else sp.t.ppf(p, df))


def summary(values):
    """(mean, sample std or None for n < 2, n)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None), len(x)


@dataclass
class Comparison:
    """A group's test loss minus the baseline's: its 95% interval, p-value and the test used."""
    delta: float
    low: float | None
    high: float | None
    p: float | None       # two-sided; None: no noise estimate
    test: str             # which test and which n, in words, e.g. "Welch t, n=3 vs 3, df=3.8"
    se: float | None = None  # standard error of delta, and the df of its test (inf: z)
    df: float | None = None
    p_adjusted: float | None = None  # after the table's correction (set by adjust)
    correction: str = "none"
    other: dict = field(default_factory=dict)  # the unpaired interval of a paired comparison

    higher_is_better: bool = False  # an accuracy rather than a loss

    @property
    def verdict(self):
        """Lower loss (higher accuracy) is better: `better` or `worse` only when the corrected p is below 5%."""
        if self.p is None:
            return "no noise estimate"
        p = self.p if self.p_adjusted is None else self.p_adjusted
        if p < ALPHA:
            return "better" if (self.delta > 0 if self.higher_is_better else self.delta < 0) else "worse"
        return "within noise"


def zero_spread(std, *values):
    """Whether a std is no measurement of noise: absent, or float rounding of identical losses
    (relative to the losses' size), as a deterministic machine's repeats give."""
    scale = max([1.0] + [abs(float(v)) for vs in values for v in np.ravel(vs)])
    return std is None or not std > ZERO_SPREAD * scale


def two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom (inf: the normal)."""
    return float(2 * (sp.norm.sf(abs(t)) if math.isinf(df) else sp.t.sf(abs(t), df)))


def t_comparison(delta, se, df, test):
    """Interval and p-value of a t (df finite) or z (df inf) statistic."""
    q = t_quantile(0.5 + LEVEL / 2, df)
    return Comparison(delta, delta - q * se, delta + q * se, two_sided_p(delta / se, df), test, se, df)


def welch(a, b):
    """Welch's t for mean(a) - mean(b) (unequal variances, Satterthwaite df; scipy's ttest_ind)."""
    (ma, sa, na), (mb, sb, nb) = summary(a), summary(b)
    if zero_spread(sa, a) and zero_spread(sb, b):  # identical replicates on both sides: nothing measures noise
        return Comparison(ma - mb, None, None, None, f"Welch t, n={na} vs {nb}, zero spread: no noise estimate")
    with warnings.catch_warnings():  # one side without spread: scipy warns of precision, the test holds
        warnings.simplefilter("ignore", RuntimeWarning)
        r = sp.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(LEVEL)
    se = math.sqrt((sa or 0.0) ** 2 / na + (sb or 0.0) ** 2 / nb)
    return Comparison(ma - mb, float(ci.low), float(ci.high), float(r.pvalue),
                      f"Welch t, n={na} vs {nb}, df={r.df:.1f}", se, float(r.df))


def paired(a, b):
    """Paired t on the seed-by-seed differences a[i] - b[i] (scipy's ttest_rel). Runs that share a
    seed share their initial weights and data, so their difference removes that part of the noise."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    md, sd, n = summary(d)
    if zero_spread(sd, a, b):
        return Comparison(md, None, None, None, f"paired t, {n} pairs, zero spread: no noise estimate")
    r = sp.ttest_rel(a, b)
    ci = r.confidence_interval(LEVEL)
    return Comparison(md, float(ci.low), float(ci.high), float(r.pvalue), f"paired t, {n} pairs, df={n - 1}",
                      sd / math.sqrt(n), n - 1)


def with_noise(a, b, sd, noise_n, noise_name):
    """When a side lacks replicates: both sides are taken to have the run-to-run std `sd`, measured
    on `noise_n` other runs (t with noise_n - 1 df), or given (noise_n None: known, a z test)."""
    (ma, _, na), (mb, _, nb) = summary(a), summary(b)
    if zero_spread(sd, a, b):
        return Comparison(ma - mb, None, None, None, f"std of {noise_name} is zero: no noise estimate")
    df = math.inf if noise_n is None else noise_n - 1
    what = f"z with given std {sd:g}" if noise_n is None else f"t with std of {noise_name} (n={noise_n})"
    return t_comparison(ma - mb, sd * math.sqrt(1 / na + 1 / nb), df, f"{what}, n={na} vs {nb}")


def bootstrap(a, b, seed=0):
    """Percentile bootstrap of mean(a) - mean(b), each side resampled on its own (scipy.stats.bootstrap);
    the p-value is twice the smaller tail of the bootstrap distribution beyond 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    delta = float(a.mean() - b.mean())
    if zero_spread(a.std(), a) and zero_spread(b.std(), b):
        return Comparison(delta, None, None, None, f"bootstrap, n={len(a)} vs {len(b)}, zero spread: no noise estimate")
    r = sp.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), n_resamples=BOOTSTRAP_RESAMPLES,
                     confidence_level=LEVEL, method="percentile", random_state=np.random.default_rng(seed))
    dist = r.bootstrap_distribution  # fixed seed: the same runs always print the same interval
    # twice the smaller tail beyond 0, never below what the resamples can resolve
    p = min(1.0, max(2 * min(float(np.mean(dist <= 0)), float(np.mean(dist >= 0))), 1 / (len(dist) + 1)))
    return Comparison(delta, float(r.confidence_interval.low), float(r.confidence_interval.high), p,
                      f"bootstrap ({BOOTSTRAP_RESAMPLES} resamples), n={len(a)} vs {len(b)}",
                      float(dist.std(ddof=1)), math.inf)


TESTS = ("auto", "bootstrap")


def compare(a, b, noise=None, pairs=False, test="auto"):
    """The right test for these samples. pairs: a[i] and b[i] share a seed (paired t; the unpaired
    interval is kept in `other`). noise = (std, n or None, name) judges a side with a single run.
    test="bootstrap": a percentile bootstrap for unpaired groups of 2 or more runs, not Welch."""
    na, nb = len(a), len(b)
    if pairs and na == nb >= 2:
        c = paired(a, b)
        u = welch(a, b)
        c.other = {"unpaired_test": u.test, "unpaired_ci_low": u.low, "unpaired_ci_high": u.high, "unpaired_p": u.p}
        return c
    if min(na, nb) >= 2:
        return bootstrap(a, b) if test == "bootstrap" else welch(a, b)
    if noise is not None:
        return with_noise(a, b, *noise)
    delta = summary(a)[0] - summary(b)[0]
    return Comparison(delta, None, None, None, f"n={na} vs {nb}, no replicates to measure the noise")


def adjust(comparisons, method="holm"):
    """Family-wise correction over the comparisons that have a p-value: Holm's step-down (controls
    the chance of any false verdict at 5%, and is never less powerful than Bonferroni), Bonferroni
    (p x m), or none. Sets p_adjusted and correction on each; returns them."""
    family = [c for c in comparisons if c.p is not None and not math.isnan(c.p)]
    m = len(family)
    order = sorted(family, key=lambda c: c.p)
    running = 0.0
    for i, c in enumerate(order):
        if method == "holm":
            running = max(running, min(1.0, (m - i) * c.p))  # monotone: never below a smaller p's
            c.p_adjusted = running
        elif method == "bonferroni":
            c.p_adjusted = min(1.0, m * c.p)
        else:
            c.p_adjusted = c.p
        c.correction = f"{method} over {m}" if method != "none" else "none"
    return comparisons


# ----------------------------------------------------------------------------------------------
# power: how many runs an effect needs, and how small an effect some runs can see


def power(effect, se, df, alpha):
    """Chance that a two-sided test at level `alpha` rejects when the true difference is `effect`
    and its estimate has standard error `se` (t with df degrees of freedom; inf: z)."""
    ncp = abs(effect) / se
    if math.isinf(df):
        q = sp.norm.ppf(1 - alpha / 2)
        return float(sp.norm.sf(q - ncp) + sp.norm.cdf(-q - ncp))
    q = sp.t.ppf(1 - alpha / 2, df)
    far = sp.nct.cdf(-q, df, ncp)  # the wrong-side tail: tiny, and scipy's nct gives nan for it at large ncp
    return float(sp.nct.sf(q, df, ncp) + (0.0 if math.isnan(far) else far))


def paired_power(effect, sd, n, m):
    """Power of one of m paired comparisons (n seeds an arm, each run's noise sd, the pairs'
    correlation taken as 0, the worst case) at Bonferroni's alpha / m: what sweep.py plans."""
    return power(effect, sd * math.sqrt(2 / n), n - 1, ALPHA / max(m, 1)) if n >= 2 else None


def detectable(se, df, m, target=POWER):
    """The smallest true difference detected with `target` power, at alpha / m, given the se and df."""
    from scipy.optimize import brentq
    alpha = ALPHA / max(m, 1)
    hi = se
    while power(hi, se, df, alpha) < target:
        hi *= 2
    return float(brentq(lambda e: power(e, se, df, alpha) - target, 0.0, hi, xtol=se * 1e-6))


def format_p(p):
    """A p-value for a table: 2 significant digits, and below what a float holds, a bound."""
    return "n/a" if p is None else (f"{p:.2g}" if p > 0 else "<1e-300")
