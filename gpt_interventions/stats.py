"""Small-sample statistics for comparing runs: Student t, Welch's t, a bootstrap, verdicts.

No scipy: the t distribution is computed from the regularized incomplete beta function (its
continued fraction, Numerical Recipes 6.4), which is all a 95% interval needs; tests pin the
quantiles against published tables.
"""

import math
from dataclasses import dataclass

import numpy as np

# With fewer runs per side, a bootstrap resamples too few distinct values and its percentile
# interval comes out narrower than the truth; Welch's t is the right test for small n.
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 10_000
LEVEL = 0.95


def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (df may be fractional, as Welch's)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p, by bisection (monotone, and plenty fast for a table)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def summary(values):
    """(mean, sample std or None for n < 2, n)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None), len(x)


@dataclass
class Comparison:
    """A run group's test loss minus the baseline's, with its 95% interval and the test used."""
    delta: float
    low: float | None
    high: float | None
    test: str  # which test and which n, in words, e.g. "Welch t, n=3 vs 3, df=3.8"

    @property
    def verdict(self):
        """Lower loss is better: `better` only when the whole interval is below zero."""
        if self.low is None:
            return "no noise estimate"
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        return "within noise"


def welch(a, b):
    """Interval for mean(a) - mean(b) from Welch's t (unequal variances, Satterthwaite df)."""
    ma, sa, na = summary(a)
    mb, sb, nb = summary(b)
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:  # identical replicates: no spread, so any difference is real
        return Comparison(ma - mb, ma - mb, ma - mb, f"Welch t, n={na} vs {nb}, zero spread")
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    half = t_quantile(0.5 + LEVEL / 2, df) * se
    return Comparison(ma - mb, ma - mb - half, ma - mb + half, f"Welch t, n={na} vs {nb}, df={df:.1f}")


def with_noise(a, b, sd, noise_n, noise_name):
    """Interval for mean(a) - mean(b) when a side lacks replicates: both sides are assumed to have
    the run-to-run std `sd` measured on another group of `noise_n` runs (t with noise_n - 1 df)."""
    (ma, _, na), (mb, _, nb) = summary(a), summary(b)
    se = sd * math.sqrt(1 / na + 1 / nb)
    half = t_quantile(0.5 + LEVEL / 2, noise_n - 1) * se
    return Comparison(ma - mb, ma - mb - half, ma - mb + half,
                      f"t with std of {noise_name} (n={noise_n}), n={na} vs {nb}")


def bootstrap(a, b, seed=0):
    """Percentile bootstrap interval for mean(a) - mean(b), resampling each side on its own."""
    rng = np.random.default_rng(seed)  # fixed: the same runs always print the same interval
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da = rng.choice(a, (BOOTSTRAP_RESAMPLES, len(a))).mean(1)
    db = rng.choice(b, (BOOTSTRAP_RESAMPLES, len(b))).mean(1)
    low, high = np.quantile(da - db, [0.5 - LEVEL / 2, 0.5 + LEVEL / 2])
    return Comparison(float(a.mean() - b.mean()), float(low), float(high),
                      f"bootstrap ({BOOTSTRAP_RESAMPLES} resamples), n={len(a)} vs {len(b)}")


def compare(a, b, noise=None):
    """The right test for these sample sizes. `noise` = (std, n, name) from another replicate
    group, used when a or b has a single run."""
    na, nb = len(a), len(b)
    if min(na, nb) >= BOOTSTRAP_MIN_N:
        return bootstrap(a, b)
    if min(na, nb) >= 2:
        return welch(a, b)
    delta = summary(a)[0] - summary(b)[0]
    if noise is not None and noise[1] >= 2:
        return with_noise(a, b, *noise)
    return Comparison(delta, None, None, f"n={na} vs {nb}, no replicates to measure the noise")
