"""gpt_interventions/stats.py and verdicts.py: corrections, paired tests, power, and the proof by
simulation that the verdicts compare.py prints keep their promises (benchmarks/simulate_verdicts.py
runs the same with more tables)."""

import math
import re

import numpy as np
import pytest

import sweep
from gpt_interventions import stats
from gpt_interventions.results import FinishedRun, group_runs
from gpt_interventions.verdicts import judge, noise_sources, simulate


def run(name, loss, **config):
    return FinishedRun(name, name, {"seed": 42, "data_seed": 0, **config}, [], loss, "test", None, 1)


def test_holm_and_bonferroni_by_hand():
    cs = [stats.Comparison(-1, None, None, p, "") for p in (0.01, 0.04, 0.03, 0.005)] + \
         [stats.Comparison(0, None, None, None, "")]  # no noise estimate: not in the family
    stats.adjust(cs, "holm")
    # sorted 0.005 x 4, 0.01 x 3, 0.03 x 2, 0.04 x 1 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert [c.p_adjusted for c in cs[:4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [c.verdict for c in cs] == ["better", "within noise", "within noise", "better", "no noise estimate"]
    assert cs[0].correction == "holm over 4"
    stats.adjust(cs, "bonferroni")
    assert [c.p_adjusted for c in cs[:4]] == pytest.approx([0.04, 0.16, 0.12, 0.02])
    stats.adjust(cs, "none")
    assert [c.p_adjusted for c in cs[:4]] == [0.01, 0.04, 0.03, 0.005]


def test_welch_and_paired_match_their_formulas():
    a, b = [3.60, 3.62, 3.64], [3.70, 3.71, 3.72]
    c = stats.welch(a, b)
    va, vb = 0.02 ** 2 / 3, 0.01 ** 2 / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    t = -0.09 / math.sqrt(va + vb)
    assert c.p == pytest.approx(2 * stats.sp.t.cdf(t, df)) and c.df == pytest.approx(df)
    d = np.array(a) - np.array(b)
    p = stats.paired(a, b)
    se = d.std(ddof=1) / math.sqrt(3)
    assert p.high == pytest.approx(d.mean() + stats.t_quantile(0.975, 2) * se) and p.test == "paired t, 3 pairs, df=2"


def test_identical_runs_give_no_noise_estimate_never_infinite_significance():
    same = [3.7, 3.7, 3.7]
    for c in (stats.welch(same, [3.6, 3.6, 3.6]), stats.paired([3.6] * 3, same), stats.bootstrap([3.6] * 12, [3.7] * 12),
              stats.with_noise([3.6], [3.7], 0.0, 3, "repeats")):
        assert c.p is None and c.verdict == "no noise estimate", c.test
    # a paired difference that is constant up to float rounding is no noise measurement either
    base = [3.70 + 0.01 * i for i in range(3)]
    assert stats.paired([x - 0.01 for x in base], base).verdict == "no noise estimate"


def test_shared_seeds_are_paired_and_far_more_sensitive():
    # a seed moves both arms alike (shared initial weights); the intervention gains 0.005
    seeds = {42: 0.02, 43: -0.015, 44: 0.004, 45: -0.006}
    runs = [run(f"b{s}", 3.7 + e, seed=s) for s, e in seeds.items()] + \
           [run(f"c{s}", 3.695 + e + 0.0005 * (-1) ** s, seed=s, grad_clip=3.5) for s, e in seeds.items()]
    rows = judge(group_runs(runs, runs[0]))
    c = rows[1].comparison
    assert c.test.startswith("paired t, 4 pairs") and c.verdict == "better"
    assert c.other["unpaired_test"].startswith("Welch") and c.other["unpaired_p"] > 0.5  # Welch sees nothing
    assert c.other["unpaired_ci_low"] < c.low < c.high < 0 < c.other["unpaired_ci_high"]


def test_noise_sources_are_told_apart():
    runs = [run("r1", 3.70), run("r2", 3.70), run("r3", 3.70),                     # repeats: identical
            run("s43", 3.71, seed=43), run("s44", 3.69, seed=44),                  # other seeds
            run("d1", 3.705, data_seed=1), run("d2", 3.695, data_seed=2)]          # other data orders
    sources = noise_sources(group_runs(runs, runs[0]))
    assert sources["repeats"] == (0.0, 2)  # float rounding of identical losses reads as zero
    assert sources["seeds"][1] == 2 and sources["seeds"][0] == pytest.approx(np.std([3.70, 3.71, 3.69], ddof=1))
    assert sources["data order"][1] == 2 and sources["data order"][0] == pytest.approx(np.std([3.70, 3.705, 3.695], ddof=1))


def test_power_is_the_noncentral_t_and_the_z_textbook_value():
    # z: an effect 2.8 standard errors away is found 80% of the time at 5% (1.96 + 0.84)
    assert stats.power(2.8016, 1.0, math.inf, 0.05) == pytest.approx(0.80, abs=0.001)
    rng = np.random.default_rng(0)  # t, by Monte Carlo: paired t with 4 pairs, effect 1.5 sd of a difference
    d = rng.normal(1.5, 1.0, (200_000, 4))
    t = d.mean(1) / (d.std(1, ddof=1) / 2)
    assert stats.power(1.5, 0.5, 3, 0.05) == pytest.approx(np.mean(np.abs(t) > stats.t_quantile(0.975, 3)), abs=0.005)


# --- proof by simulation: synthetic tables through judge(), the code path of compare.py ----------


@pytest.mark.parametrize("paired", [False, True], ids=["welch", "paired"])
def test_family_wise_false_verdicts_stay_at_5_percent_when_nothing_works(paired):
    tables = simulate(1000, arms=5, n=3, effects=[0.0] * 5, sigma=0.002, seed_sd=0.003, paired=paired)
    any_false = np.mean([any(c.verdict in ("better", "worse") for c in t) for t in tables])
    assert any_false <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 1000)  # a seeded simulation: no flakes
    # uncorrected, the same tables make a false verdict far more often: the correction is doing work
    raw = np.mean([any(c.p < 0.05 for c in t) for t in tables])
    assert raw > 0.1 and raw > 2 * any_false


def test_intervals_cover_the_true_effects():
    effects = [-0.004, -0.002, 0.0, 0.001, 0.003]
    for paired in (False, True):
        tables = simulate(600, arms=5, n=4, effects=effects, sigma=0.002, seed_sd=0.002, paired=paired, seed=1)
        covered = np.mean([c.low <= e <= c.high for t in tables for c, e in zip(t, effects)])
        assert covered >= 0.94, (paired, covered)


def test_the_planners_promised_power_is_met(tmp_path, capsys):
    # one-at-a-time, 4 arms, effect 0.004 at noise 0.0017: the planner's seeds and promised power...
    factors = ["--factor", "grad_clip=0,3.5", "--factor", "qkv_bias=False,True", "--factor", "dropout=0.1,0",
               "--factor", "weight_decay=0.1,0.01"]
    sweep.main(["plan", *factors, "--effect=0.004", "--noise_std=0.0017", f"--out={tmp_path / 'p'}"])
    out = capsys.readouterr().out
    seeds, promised = map(int, re.search(r"(\d+) seed\(s\) per configuration give (\d+)% power", out).groups())
    assert "holm over 4" in out and seeds >= 2 and promised >= 80
    # ...met by compare.py's verdicts on simulated runs: one real arm among three null ones
    tables = simulate(1500, arms=4, n=seeds, effects=[-0.004, 0.0, 0.0, 0.0], sigma=0.0017, seed_sd=0.0,
                      paired=True, seed=2)
    found = np.mean([t[0].verdict == "better" for t in tables])
    assert found >= promised / 100 - 0.035, (found, promised)


def test_the_factorial_planner_matches_simulated_fits():
    # a full 2^3 design, 2 seeds a cell: each effect 2 sigma / sqrt(16), df 8, 6 effects Holm-corrected;
    # simulated tables through design.fit find the real main effect as often as effect_power says
    from gpt_interventions import design
    X = np.repeat(design.full(3), 2, axis=0)
    promised = design.effect_power(0.004, 0.002, 8, 2, 6, 6)
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(1500):
        fit = design.fit(X, 3.7 - 0.002 * X[:, 0] + rng.normal(0, 0.002, len(X)))
        cs = [stats.Comparison(e.estimate, None, None, stats.two_sided_p(e.estimate / e.se, fit.df), "")
              for e in fit.effects]
        stats.adjust(cs, "holm")
        found += cs[0].verdict == "better"
    assert len(fit.effects) == 6 and found / 1500 == pytest.approx(promised, abs=0.035)
