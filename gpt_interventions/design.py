"""Two-level factorial designs: full and fractional 2^(k-p), their alias structure, and effects.

Factors are coded -1 (the first level: the baseline) and +1 (the second level). An effect is
Box, Hunter & Hunter's: the mean response at +1 minus the mean at -1, i.e. twice the regression
coefficient. Words such as "ABCE" name products of factor columns; letters are the factors in
the order given.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np

from gpt_interventions.stats import ALPHA, power, t_quantile, zero_spread

LETTERS = "ABCDEFGHJKLMNOPQRSTUVWXYZ"  # no I: it is the identity column

# Minimum-aberration generators (Box, Hunter & Hunter, table 6.22; NIST handbook 5.3.3.4.7),
# keyed by (k, p): the last p factors are products of the first k - p.
GENERATORS = {
    (3, 1): ["C=AB"], (4, 1): ["D=ABC"], (5, 1): ["E=ABCD"], (5, 2): ["D=AB", "E=AC"],
    (6, 1): ["F=ABCDE"], (6, 2): ["E=ABC", "F=BCD"], (6, 3): ["D=AB", "E=AC", "F=BC"],
    (7, 1): ["G=ABCDEF"], (7, 2): ["F=ABCD", "G=ABDE"], (7, 3): ["E=ABC", "F=BCD", "G=ACD"],
    (7, 4): ["D=AB", "E=AC", "F=BC", "G=ABC"], (8, 4): ["E=BCD", "F=ACD", "G=ABC", "H=ABD"],
}


def full(k):
    """All 2^k runs in standard (Yates) order: the first factor alternates fastest."""
    return np.array([[1 if (i >> j) & 1 else -1 for j in range(k)] for i in range(2 ** k)])


def fractional(k, p, baseline=False):
    """(design matrix, generators) of the 2^(k-p) fraction. baseline=True picks the generators'
    signs so that the all-first-levels run (the baseline) is in the fraction."""
    if p == 0:
        return full(k), []
    if (k, p) not in GENERATORS:
        raise ValueError(f"no 2^({k}-{p}) design is tabulated; known: "
                         + ", ".join(f"2^({a}-{b})" for a, b in GENERATORS))
    base = full(k - p)
    cols, gens = [base[:, j] for j in range(k - p)], []
    for gen in GENERATORS[(k, p)]:
        word = gen.split("=")[1]
        sign = (-1) ** (len(word) + 1) if baseline else 1  # at the all -1 corner the product is (-1)^len
        cols.append(sign * np.prod([base[:, LETTERS.index(c)] for c in word], axis=0))
        gens.append(f"{gen[0]}={'-' if sign < 0 else ''}{word}")
    return np.stack(cols, axis=1), gens


def defining_relation(X):
    """Words (with sign) whose column product is constant over the runs: I = ±word. These are what
    the design cannot tell apart from the mean."""
    k = X.shape[1]
    words = []
    for r in range(1, k + 1):
        for combo in itertools.combinations(range(k), r):
            col = np.prod(X[:, combo], axis=1)
            if np.all(col == col[0]):
                words.append(("-" if col[0] < 0 else "") + "".join(LETTERS[i] for i in combo))
    return words


def resolution(words):
    """Shortest word length of the defining relation; None for a full factorial (nothing aliased)."""
    return min(len(w.lstrip("-")) for w in words) if words else None


def roman(n):
    return {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}.get(n, str(n))


def multiply(a, b):
    """Product of two words: letters squared vanish (A*A = I)."""
    return "".join(sorted(set(a) ^ set(b), key=LETTERS.index)) or "I"


def effect_names(k, order=2):
    """Main effects, then two-factor interactions: A, B, ..., AB, AC, ..."""
    return ["".join(LETTERS[i] for i in c) for r in range(1, order + 1) for c in itertools.combinations(range(k), r)]


def aliases(name, words, max_len=None):
    """What `name` is confounded with: name * each defining word (short words first)."""
    out = []
    for w in words:
        sign, letters = ("-", w[1:]) if w.startswith("-") else ("", w)
        a = multiply(name, letters)
        if max_len is None or len(a) <= max_len:
            out.append(sign + a)
    return sorted(out, key=lambda s: (len(s.lstrip("-")), s))


def column(X, name):
    return np.prod([X[:, LETTERS.index(c)] for c in name], axis=0)


@dataclass
class Effect:
    name: str            # e.g. "AB"
    estimate: float      # mean at +1 minus mean at -1
    se: float | None     # None when the runs leave no way to measure the noise
    aliases: list        # other effects (up to two factors) it cannot be told apart from


@dataclass
class Fit:
    effects: list
    beta: np.ndarray     # regression coefficients: intercept, then one per effect
    cov: np.ndarray | None  # their covariance, from the noise estimate
    sigma: float | None
    df: int
    noise: str           # where sigma came from, in words
    words: list          # defining relation: I = each word
    confounded: list     # effects not estimable, beyond the alias chains


def fit(X, y, noise_sd=0.0, noise_n=None):
    """Least squares on the main effects and the two-factor interactions the design can estimate.

    Of effects aliased with each other only the first is fitted (its estimate is the sum of the
    chain). The noise: replicate runs of the same cell first, else the model's residuals, else a
    given std (noise_sd measured on noise_n runs, or known if noise_n is None); without any,
    standard errors are None.
    """
    X, y = np.asarray(X), np.asarray(y, dtype=np.float64)
    words = defining_relation(X)
    names, cols, skipped, confounded = [], [], {}, []
    for name in effect_names(X.shape[1]):
        c = column(X, name)
        if np.all(c == c[0]):  # aliased with the mean itself
            continue
        twin = next((n for n, other in zip(names, cols) if abs(c @ other) == len(c)), None)
        if twin is not None:
            skipped.setdefault(twin, []).append(name)
            continue
        if np.linalg.matrix_rank(np.column_stack([np.ones(len(c)), *cols, c])) < len(cols) + 2:
            confounded.append(name)  # a mix of fitted effects, as interactions in one-at-a-time runs
            continue
        names.append(name)
        cols.append(c)
    A = np.column_stack([np.ones(len(y)), *cols])
    beta, *_ = np.linalg.lstsq(A, y, rcond=None)
    cells = {}
    for row, value in zip(map(tuple, X), y):
        cells.setdefault(row, []).append(value)
    pure_df = sum(len(v) - 1 for v in cells.values())
    if pure_df > 0:
        sigma2 = sum(((np.array(v) - np.mean(v)) ** 2).sum() for v in cells.values()) / pure_df
        df, noise = pure_df, f"replicates (pooled within-cell std, df={pure_df})"
    elif len(y) > A.shape[1]:
        resid = y - A @ beta
        df = len(y) - A.shape[1]
        sigma2, noise = float(resid @ resid) / df, f"residuals of the fitted model (df={df})"
    elif noise_sd > 0:  # measured on noise_n other runs, or (None) known
        df = noise_n - 1 if noise_n else math.inf
        sigma2, noise = noise_sd ** 2, f"given std {noise_sd:g}" + (f" (n={noise_n})" if noise_n else " (known: z)")
    else:
        sigma2, df, noise = None, 0, "none: no replicates, no residual df (plan with --seeds=2)"
    if sigma2 is not None and zero_spread(math.sqrt(sigma2), y):
        # identical replicates (a deterministic machine): zero spread is no measurement of noise
        sigma2, df, noise = None, 0, f"none: {noise} is zero (identical runs: plan other seeds)"
    cov = sigma2 * np.linalg.pinv(A.T @ A) if sigma2 is not None else None
    effects = []
    for i, name in enumerate(names, start=1):
        chain = [a for a in aliases(name, words, max_len=2) if a.lstrip("-") != "I"] or skipped.get(name, [])
        se = 2 * math.sqrt(cov[i, i]) if cov is not None else None
        effects.append(Effect(name, 2 * float(beta[i]), se, chain))
    return Fit(effects, beta, cov, math.sqrt(sigma2) if sigma2 is not None else None, df, noise, words,
               confounded)


def predict(f, x):
    """(predicted response, 95% half-width or None) at coded levels x (a sequence of ±1)."""
    x = np.asarray(x)
    a = np.array([1.0, *[column(x[None, :], e.name)[0] for e in f.effects]])
    mean = float(a @ f.beta)
    if f.cov is None:
        return mean, None
    return mean, t_quantile(0.975, f.df) * math.sqrt(float(a @ f.cov @ a))


def best(f, k):
    """The coded combination of the 2^k with the lowest predicted response."""
    return min(full(k), key=lambda x: predict(f, x)[0])


def effect_power(effect, sigma, cells, seeds, m, fitted):
    """Power of one effect of a two-level design with `cells` configurations x `seeds` runs each:
    an effect is a difference of two means of N/2 runs, so its standard error is 2 sigma / sqrt(N);
    its df is the replicates' (cells x (seeds - 1)), or with one seed the residuals' after the
    `fitted` effects and the mean. Tested at alpha / m (Bonferroni, which Holm never needs more
    than). None when no df is left to measure the noise."""
    n = cells * seeds
    df = cells * (seeds - 1) if seeds > 1 else n - 1 - fitted
    if df <= 0:
        return None
    return power(effect, 2 * sigma / math.sqrt(n), df, ALPHA / max(m, 1))
