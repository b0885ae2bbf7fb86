"""sweep.py ladder (gpt_interventions/ladder.py): the size rule, the shared-floor fit, its
bootstrap intervals' coverage, and the analysis of finished run directories."""

import os

import numpy as np
import pytest

import sweep
from gpt_interventions import ladder
from gpt_interventions.cli import load_preset, parse_config
from gpt_interventions.errors import UsageError
from gpt_interventions.training import TrainConfig
from helpers import ROOT, fake_run
from model import GPTConfig

E, A, ALPHA = 2.8, [0.9, 0.8], [0.22, 0.3]  # the true curves: L = E + A x^-alpha, x = C / C_target
XS = [0.006, 0.03, 0.09]


def simulated(rng, seeds=3, sd=0.01, xs=XS):
    return [(a, x, E + A[a] * x ** -ALPHA[a] + rng.normal(0, sd), s)
            for s in range(seeds) for a in range(2) for x in xs]


def test_the_fit_recovers_known_parameters():
    exact, _ = ladder.fit([p[:3] for p in simulated(np.random.default_rng(0), sd=0.0)], 2)
    assert exact.E == pytest.approx(E, abs=1e-6) and exact.A == pytest.approx(A, abs=1e-6)
    assert exact.alpha == pytest.approx(ALPHA, abs=1e-6)
    # with noise (std 0.001 per run, 5 seeds, a fourth rung): the fit moves by about the noise
    noisy, _ = ladder.fit([p[:3] for p in simulated(np.random.default_rng(1), 5, 0.001, XS + [0.2])], 2)
    assert noisy.E == pytest.approx(E, abs=0.05) and noisy.A == pytest.approx(A, abs=0.05)
    assert noisy.alpha == pytest.approx(ALPHA, abs=0.03)
    assert abs(noisy.predict(1) - noisy.predict(0) - (A[1] - A[0])) < 0.01


def test_the_intervals_cover_the_true_difference_at_the_stated_rate():
    """200 simulated ladders (3 seeds, noise std 0.01): the 95% interval of the difference at the
    target covers A_1 - A_0 in 95% of them, give or take 3 binomial standard errors
    (sqrt(0.95 x 0.05 / 200) = 0.015): between 90.4% and 99.6%."""
    rng, hits = np.random.default_rng(2), 0
    for i in range(200):
        _, _, diffs = ladder.bootstrap(simulated(rng), 2, draws=40, seed=i)
        hits += diffs[1][1] <= A[1] - A[0] <= diffs[1][2]
    assert 0.904 <= hits / 200 <= 0.996, hits


def test_lack_of_fit_flags_curves_of_another_form_and_passes_the_true_one():
    """The lack-of-fit F test: the true curves with noise pass; the same rungs with the middle one 0.05
    too high (a bend no power law has) fail; three rungs of two arms leave 1 degree of freedom, two none."""
    xs = XS + [0.2]
    true = simulated(np.random.default_rng(4), seeds=3, sd=0.01, xs=xs)
    F, df_lack, df_pure, p = ladder.lack_of_fit(true, ladder.fit([q[:3] for q in true], 2)[0])
    assert (df_lack, df_pure) == (8 - 5, 8 * 2) and p > 0.05
    bent = [(a, x, loss + 0.05 * (x == XS[1]), s) for a, x, loss, s in true]
    fit_, _ = ladder.fit([q[:3] for q in bent], 2)
    assert ladder.lack_of_fit(bent, fit_)[3] < 0.001
    assert "does not hold across these rungs" in ladder.lack_of_fit_line(bent, fit_)
    three = [q for q in true if q[1] in XS]
    assert ladder.lack_of_fit(three, ladder.fit([q[:3] for q in three], 2)[0])[1:3] == (1, 12)
    two = [q for q in true if q[1] in XS[:2]]
    assert ladder.lack_of_fit(two, ladder.fit([q[:3] for q in two], 2)[0]) is None


def test_the_backtest_says_whether_each_measurement_lies_inside_its_interval():
    names = ["learned", "rope"]
    losses, diffs = {0: (7.78, 7.73, 7.84), 1: (7.77, 7.72, 7.83)}, {1: (-0.012, -0.018, -0.006)}
    lines = ladder.backtest_lines({0: [7.76, 7.77], 1: [7.63, 7.64]}, names, losses, diffs)
    assert lines[1] == ("  learned over 2 run(s): predicted 7.7800, measured 7.7650, error +0.0150, "
                        "inside the 95% interval")
    assert lines[2].endswith("measured 7.6350, error +0.1350, OUTSIDE the 95% interval")
    assert lines[3] == ("  rope - learned: predicted -0.0120, measured -0.1300, error +0.1180, "
                        "OUTSIDE the 95% interval")
    assert "larger than its interval says" in lines[4]
    inside = ladder.backtest_lines({0: [7.78], 1: [7.77]}, names, losses, diffs)
    assert len(inside) == 4 and "OUTSIDE" not in "".join(inside)
    assert "no finished target-scale runs" in ladder.backtest_lines({}, names, losses, diffs)[0]


def test_plan_sizes_follow_the_rule(tmp_path, capsys):
    out = tmp_path / "lad"
    names = sweep.main(["ladder", "--factor", "qkv_bias=False,True", "--rungs=2,4,6,12", "--seeds=2", f"--out={out}"])
    assert len(names) == 4 * 2 * 2
    assert names[0] == "lad-00-n_layer2-s42" and names[-1] == "lad-07-n_layer12_qkv_biasTrue-s43"
    target, _ = parse_config([], [GPTConfig, TrainConfig], "train.py", "")[0]
    seen = set()
    for name in names:
        (mc, tc), _, _ = parse_config([str(out / f"{name}.toml")], [GPTConfig, TrainConfig], "train.py", "")
        assert mc.n_embd == 64 * mc.n_layer and mc.n_head == mc.n_layer  # the story's 768 / 12 and 64-wide heads
        params = ladder.size_of(GPTConfig(**{**mc.__dict__, "qkv_bias": False}))[0]  # the baseline arm's
        assert abs(tc.max_tokens - 20 * params) <= 1  # the target's 3,260,190,720 / 163,009,536 = 20; every arm
        assert (mc.parametrization, mc.mup_base_width) == ("mup", 768)
        seen.add((mc.n_layer, mc.qkv_bias, tc.seed))
    assert seen == {(n, q, s) for n in (2, 4, 6, 12) for q in (False, True) for s in (42, 43)}
    assert ladder.size_of(target)[0] == 163_009_536 and ladder.rung_shape(target, 12)["n_embd"] == 768
    script = (out / "run.sh").read_text().splitlines()
    assert "ladder --analyze 'out/lad-*' --factor qkv_bias=False,True --split=test" in script[-1]
    # flops_per_token x tokens of rungs 2, 4, 6 over the target's: integer arithmetic, no kernel
    assert "fitted rungs cost 10.1% of one target run" in capsys.readouterr().out


def test_analyze_reads_run_directories_end_to_end(tmp_path, capsys):
    """Fake runs on the true curves (plus noise) at three rungs, and target-scale runs for the backtest."""
    target, ttc = parse_config([], [GPTConfig, TrainConfig], "train.py", "")[0]
    target_c = ladder.size_of(target)[1] * ttc.max_tokens
    rng = np.random.default_rng(3)
    for n_layer in (2, 4, 6, 12):
        shape = ladder.rung_shape(target, n_layer)
        mc = GPTConfig(**{**target.__dict__, **shape})
        tokens = 20 * ladder.size_of(mc)[0]
        x = ladder.size_of(mc)[1] * tokens / target_c
        for arm, qkv in enumerate((False, True)):
            for seed in (42, 43, 44):
                loss = E + A[arm] * x ** -ALPHA[arm] + rng.normal(0, 0.002)
                fake_run(tmp_path, f"lad-{n_layer}-{qkv}-{seed}", loss, qkv_bias=qkv, seed=seed, max_tokens=tokens,
                         parametrization="mup", mup_base_width=768, **shape)
    fake_run(tmp_path, "lad-diverged", float("nan"), seed=45)
    best, losses, diffs = sweep.main(["ladder", "--analyze", str(tmp_path / "lad-*"), "--factor=qkv_bias=False,True",
                                      "--bootstrap=200"])
    printed = capsys.readouterr().out
    assert "18 ladder runs, 6 target-scale runs" in printed and "lad-diverged" in printed
    low, high = diffs[1][1:]
    assert high < 0 and low < A[1] - A[0] < high and "excludes zero" in printed
    assert losses[0][0] == pytest.approx(E + A[0], abs=0.05)
    assert "backtest" in printed and "measured" in printed and "DataDecide" in printed and "residuals" in printed
    assert "lack of fit: F(1, 12)" in printed


@pytest.mark.parametrize("args,message", [
    (["--factor=qkv_bias=False,True", "--rungs=2,4"], "at least three rungs"),
    (["--factor=qkv_bias=False,True", "--seeds=1"], "--seeds of 2 or more"),
    (["--factor=n_layer=2,4"], "an arm cannot change them"),
    (["--factor=qkv_bias=False,True", "out/x"], "add --analyze"),
    (["--analyze", "--factor=qkv_bias=False,True"], "takes run directories"),
])
def test_bad_ladder_input_is_a_usage_error(args, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        seeds = [] if "--seeds=1" in args else ["--seeds=2"]
        sweep.main(["ladder", f"--out={tmp_path / 'never'}", *seeds, *args])
    assert not os.path.exists(tmp_path / "never")


def test_the_tiny_ladder_target_is_tiny_made_deeper():
    """config/tiny-ladder.toml, the target of interventions.md's worked tiny ladder: config/tiny.toml
    with 4 blocks of 16-wide heads, so that three rungs lie below it."""
    tiny, target = (load_preset(os.path.join(ROOT, "config", name)) for name in ("tiny.toml", "tiny-ladder.toml"))
    assert target == {**tiny, "n_layer": 4, "n_head": 4}


def test_a_target_counted_in_steps_gives_rungs_counted_in_tokens(tmp_path, capsys):
    """config/tiny-ladder.toml trains max_iters = 100 steps of 2,048 tokens: the target's tokens are
    those, and every rung trains by max_tokens (max_iters 0), or its token count would be ignored."""
    target = os.path.join(ROOT, "config", "tiny-ladder.toml")
    out = tmp_path / "lad"
    names = sweep.main(["ladder", "--factor", "qkv_bias=False,True", "--rungs=1,2,3", "--seeds=2", f"--out={out}",
                        f"--preset={target}"])
    (tmc, _), _, _ = parse_config([target], [GPTConfig, TrainConfig], "train.py", "")
    tpp = 100 * 2048 / ladder.size_of(tmc)[0]
    shapes = set()
    for name in names:
        (mc, tc), _, _ = parse_config([str(out / f"{name}.toml")], [GPTConfig, TrainConfig], "train.py", "")
        assert tc.max_iters == 0 and mc.block_size == 64  # the preset underneath
        assert abs(tc.max_tokens - tpp * ladder.size_of(GPTConfig(**{**mc.__dict__, "qkv_bias": False}))[0]) <= 1
        shapes.add((mc.n_layer, mc.n_embd, mc.n_head, mc.mup_base_width))
    assert shapes == {(1, 16, 1, 64), (2, 32, 2, 64), (3, 48, 3, 64)}  # 16 per layer, 16-wide heads
    assert (out / f"{names[0]}.toml").read_text().startswith("# ladder lad, run 0: n_layer=1,")
