"""sweep.py and design.py: designs, their alias structure, and effects recovered from known answers."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import sweep
from gpt_interventions import design, stats
from gpt_interventions.cli import parse_config
from gpt_interventions.errors import UsageError
from gpt_interventions.training import TrainConfig
from helpers import ROOT, cli, fake_run, make_shards
from model import GPTConfig

FIVE = ["grad_clip=0,3.5", "qkv_bias=False,True", "weight_decay=0.1,0.01", "dropout=0.1,0",
        "learning_rate=0.0004,0.0014 lr_schedule=constant,cosine warmup_frac=0,0.05 min_lr=0.00004,0.00014"]


def truth(x):
    """A known response: three main effects and two interactions, in coded units (effect = 2 * coef)."""
    a, b, c, d, e = x
    return 3.7 - 0.006 * a - 0.011 * b - 0.024 * c + 0.002 * d - 0.045 * e + 0.010 * c * e - 0.004 * a * b


def test_half_fraction_of_five_factors_is_resolution_five():
    X, gens = design.fractional(5, 1)
    assert gens == ["E=ABCD"] and X.shape == (16, 5) and len({tuple(r) for r in X}) == 16
    assert np.array_equal(X[:, 4], X[:, :4].prod(axis=1))
    assert (X.T @ X == 16 * np.eye(5)).all()  # orthogonal, balanced columns
    words = design.defining_relation(X)
    assert words == ["ABCDE"] and design.resolution(words) == 5
    assert design.aliases("A", words) == ["BCDE"] and design.aliases("DE", words) == ["ABC"]
    # no main effect or two-factor interaction is aliased with another of them
    assert all(len(design.aliases(n, words)[0]) >= 3 for n in design.effect_names(5))


def test_quarter_fraction_and_the_fraction_that_keeps_the_baseline():
    X, gens = design.fractional(5, 2, baseline=True)
    assert gens == ["D=-AB", "E=-AC"] and [-1] * 5 in X.tolist()
    words = design.defining_relation(X)
    assert sorted(words) == ["-ABD", "-ACE", "BCDE"] and design.resolution(words) == 3
    assert design.aliases("A", words) == ["-BD", "-CE", "ABCDE"]
    X1, _ = design.fractional(5, 1, baseline=True)
    assert [-1] * 5 in X1.tolist() and design.defining_relation(X1) == ["-ABCDE"]


@pytest.mark.parametrize("X", [design.full(5), design.fractional(5, 1)[0]], ids=["full", "half"])
def test_effects_and_interactions_recovered_exactly_without_noise(X):
    fit = design.fit(X, [truth(x) for x in X])
    got = {e.name: e.estimate for e in fit.effects}
    want = {n: 0.0 for n in design.effect_names(5)}
    want.update(A=-0.012, B=-0.022, C=-0.048, D=0.004, E=-0.090, CE=0.020, AB=-0.008)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    best = design.best(fit, 5)
    assert best.tolist() == [1, 1, 1, -1, 1]
    assert design.predict(fit, best)[0] == pytest.approx(truth(best), abs=1e-12)


def test_resolution_four_reports_the_alias_chain_and_estimates_its_sum():
    X, _ = design.fractional(4, 1)  # D = ABC: AB is aliased with CD
    y = [1.0 + 0.3 * x[0] * x[1] + 0.1 * x[2] * x[3] for x in X]
    fit = design.fit(X, y)
    ab = next(e for e in fit.effects if e.name == "AB")
    assert ab.aliases == ["CD"] and ab.estimate == pytest.approx(2 * (0.3 + 0.1))
    assert "CD" not in [e.name for e in fit.effects]


def test_standard_errors_come_from_replicates():
    X = np.repeat(design.full(2), 2, axis=0)  # every cell twice
    noise = np.tile([0.01, -0.01], 4)
    fit = design.fit(X, 2.0 + 0.5 * X[:, 0] + noise)
    a = fit.effects[0]
    assert a.estimate == pytest.approx(1.0)
    assert fit.df == 4 and fit.sigma == pytest.approx(np.sqrt(2) * 0.01)  # pairs differ by 0.02
    assert a.se == pytest.approx(2 * fit.sigma / np.sqrt(8))  # effect = 2 coef; var(coef) = s^2 / N


def run_plan(tmp_path, *args):
    out = tmp_path / "sw"
    names = sweep.main(["plan", *sum((["--factor", f] for f in FIVE), []), f"--out={out}",
                        f"--preset={os.path.join(ROOT, 'config/tiny.toml')}", *args])
    return out, names


def test_plan_writes_presets_train_accepts_and_a_script(tmp_path, capsys):
    out, names = run_plan(tmp_path, "--design=fractional", "--seeds=2")
    printed = capsys.readouterr().out
    assert "resolution V, generators E=ABCD" in printed and "AB = CDE" in printed
    assert len(names) == 32 and names[0] == "sw-00-learning_rate0.0014-s42"
    configs = []
    for name in names:
        (mc, tc), _, _ = parse_config([str(out / f"{name}.toml")], [GPTConfig, TrainConfig], "train.py", "")
        assert tc.run_name == name and mc.n_layer == 2  # the tiny preset underneath
        configs.append((tc.grad_clip, mc.qkv_bias, tc.weight_decay, mc.dropout, tc.learning_rate, tc.lr_schedule))
    assert len(set(configs)) == 16 and ("cosine" in configs[0]) and configs[0][4] == 0.0014
    script = (out / "run.sh").read_text().splitlines()
    trains = [line for line in script if "train.py" in line]
    assert len(trains) == 32 and f"{sys.executable} {ROOT}/train.py {out}/{names[0]}.toml" in trains[0]
    assert script[0] == "#!/bin/sh" and "set -eu" in script and f"cd {os.getcwd()}" in script
    assert any(line.startswith(f"{sys.executable} {ROOT}/sweep.py analyze 'out/sw-*'") for line in script)


def test_one_at_a_time_plan_and_torchrun(tmp_path, capsys):
    out, names = run_plan(tmp_path, "--torchrun=8")
    assert names == ["sw-00-baseline", "sw-01-grad_clip3.5", "sw-02-qkv_biasTrue", "sw-03-weight_decay0.01",
                     "sw-04-dropout0", "sw-05-learning_rate0.0014"]
    assert f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=8 {ROOT}/train.py" \
        in (out / "run.sh").read_text()


def test_analyze_recovers_the_effects_from_run_directories(tmp_path, capsys):
    X, _ = design.fractional(5, 1)
    for i, x in enumerate(X.tolist()):
        for seed, eps in ((42, 0.002), (43, -0.002)):
            fake_run(tmp_path, f"r{i:02d}-{seed}", truth(x) + eps, seed=seed, grad_clip=[0.0, 3.5][x[0] > 0],
                     qkv_bias=bool(x[1] > 0), weight_decay=[0.1, 0.01][x[2] > 0], dropout=[0.1, 0.0][x[3] > 0],
                     learning_rate=[0.0004, 0.0014][x[4] > 0], lr_schedule=["constant", "cosine"][x[4] > 0])
    fit = sweep.main(["analyze", str(tmp_path / "r*"), *sum((["--factor", f] for f in FIVE[:4]), []),
                      "--factor", "learning_rate=0.0004,0.0014 lr_schedule=constant,cosine"])
    out = capsys.readouterr().out
    assert "resolution V" in out and "noise: replicates (pooled within-cell std, df=16)" in out
    got = {e.name: e for e in fit.effects}
    assert got["C"].estimate == pytest.approx(-0.048) and got["CE"].estimate == pytest.approx(0.020)
    assert got["C"].se == pytest.approx(2 * 0.002 * np.sqrt(2) / np.sqrt(32))
    assert "predicted best: grad_clip=3.5; qkv_bias=True; weight_decay=0.01; dropout=0.1; learning_rate=0.0014" in out
    # verdicts, corrected over the 15 effects: the real ones stand, the zero ones do not
    verdict = {line.split()[0]: line for line in out.splitlines() if line[:3].strip() in got}
    assert "worse" in verdict["CE"] and "better" in verdict["C"] and "within noise" in verdict["AC"]
    assert "verdicts corrected (holm) over the 15 effects" in out
    # without --factor the factors are inferred in field order, low = the smaller value, and the
    # learning-rate fields move together as one factor
    sweep.main(["analyze", str(tmp_path / "r*")])
    out = capsys.readouterr().out
    assert "E: grad_clip=0  ->  grad_clip=3.5" in out
    assert "C: learning_rate=0.0004, lr_schedule=constant  ->  learning_rate=0.0014, lr_schedule=cosine" in out
    assert "D       weight_decay                  +0.048000" in out  # 0.01 -> 0.1 now: the sign flips


def test_one_at_a_time_cannot_estimate_interactions(tmp_path, capsys):
    for name, loss, kw in [("base", 3.70, {}), ("gc", 3.69, {"grad_clip": 3.5}), ("qkv", 3.68, {"qkv_bias": True})]:
        fake_run(tmp_path, name, loss, **kw)
    fit = sweep.main(["analyze", str(tmp_path / "*")])
    out = capsys.readouterr().out
    assert "not a two-level factorial: 3 of the 4 configurations" in out
    assert fit.confounded == ["AB"] and [e.estimate for e in fit.effects] == pytest.approx([-0.02, -0.01])  # A: qkv_bias (model fields first)
    assert "no interval" in out


def test_analyze_lists_the_runs_it_leaves_out_and_judges_one_split(tmp_path, capsys):
    # a 2^2 design twice over; the baseline cell's seed-42 run diverged and one more run has only a
    # validation loss (0.05 above the test losses): neither may enter the fit
    for gc in (0.0, 3.5):
        for qkv in (False, True):
            for seed in (42, 43):
                loss = 3.70 - 0.01 * (gc > 0) - 0.02 * qkv + 0.001 * (seed - 42)
                diverged = (gc, qkv, seed) == (0.0, False, 42)
                fake_run(tmp_path, f"r-{gc}-{qkv}-{seed}", math.nan if diverged else loss, grad_clip=gc,
                         qkv_bias=qkv, seed=seed)
    fake_run(tmp_path, "val-only", None, rows=[{"step": 10, "val_loss": 3.72}], grad_clip=3.5, qkv_bias=True, seed=44)
    sweep.main(["analyze", str(tmp_path / "*")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "7 runs, 4 distinct configurations"
    assert "judged: test losses, eval.py's float32 score of each run's final checkpoint (ckpt.pt at its last step)" in out
    assert "left out of the verdicts: r-0.0-False-42: its test loss is nan (diverged)" in out
    assert any(line.startswith("left out of the verdicts: val-only: no float32 story/test score") for line in out)
    code, err = cli(sweep.main, ["analyze", str(tmp_path / "*"), "--split=val"], capsys)
    assert code == 2 and "analyze needs at least two runs with a val loss; 1 of 9 have one" in err


def test_a_factorial_script_goes_on_to_its_analysis_when_compare_refuses(tmp_path, capsys):
    for design_flag, survives in (("--design=full", True), ("--design=one-at-a-time", False)):
        out, _ = run_plan(tmp_path / design_flag[9:], design_flag)
        line = next(x for x in (out / "run.sh").read_text().splitlines() if "compare.py" in x)
        assert line.endswith(" || echo 'compare.py judged nothing; the factorial analysis follows'") == survives


@pytest.mark.parametrize("args, message", [
    (["plan", "--factor", "grad_clp=0,1"], "did you mean --grad_clip"),
    (["plan", "--factor", "grad_clip=0,1,2", "--design=full"], "needs exactly two levels"),
    (["plan", "--factor", "grad_clip=0"], "expected FIELD=LEVEL1,LEVEL2"),
    (["plan"], "at least one"),
    # each run sets every factor: the second factor's gelu would undo the first's swiglu
    (["plan", "--factor", "mlp=gelu,swiglu", "--factor", "mlp=gelu,relu2"], "mlp in more than one --factor"),
    (["frobnicate"], "usage: sweep.py"),
])
def test_bad_input_is_a_usage_error(args, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        sweep.main([*args, f"--out={tmp_path / 'x'}"])


def test_a_field_with_three_levels_is_one_factor_and_each_run_means_its_name(tmp_path, capsys):
    out = tmp_path / "m"
    names = sweep.main(["plan", "--factor", "mlp=gelu,swiglu,relu2", "--factor", "qk_norm=False,True", f"--out={out}"])
    assert names == ["m-00-baseline", "m-01-mlpswiglu", "m-02-mlprelu2", "m-03-qk_normTrue"]  # one seed: no suffix
    configs = [parse_config([str(out / f"{n}.toml")], [GPTConfig, TrainConfig], "train.py", "")[0][0] for n in names]
    assert [(mc.mlp, mc.qk_norm) for mc in configs] == [("gelu", False), ("swiglu", False), ("relu2", False),
                                                         ("gelu", True)]


def test_power_plan_seeds_runs_and_cost(tmp_path, capsys):
    # a 2^(5-1) design: an effect is the difference of two means of N/2 runs, SE = 2 sigma / sqrt(N);
    # 15 effects (resolution V), tested at 0.05 / 15; replicates give 16 x (seeds - 1) df
    out, names = run_plan(tmp_path, "--design=fractional", "--effect=0.005", "--noise_std=0.0017",
                          "--hours_per_run=3", "--usd_per_hour=2.5", "--torchrun=8")
    printed = capsys.readouterr().out
    want = next(s for s in range(2, 50) if stats.power(0.005, 2 * 0.0017 / np.sqrt(16 * s), 16 * (s - 1), 0.05 / 15) >= 0.8)
    power = stats.power(0.005, 2 * 0.0017 / np.sqrt(16 * want), 16 * (want - 1), 0.05 / 15)
    assert "15 effects of 16 configurations, holm over 15" in printed
    assert f"{want} seed(s) per configuration give {power:.0%} power ({16 * want} runs)" in printed
    assert len(names) == 16 * want  # planned with the seeds it needs
    assert f"cost: {16 * want} runs x 3 h x 8 GPU(s) = {16 * want * 24:,.1f} GPU-hours = ${16 * want * 60:,.0f}" in printed
    # an explicit --seeds is kept, and the plan says what it buys
    run_plan(tmp_path / "two", "--design=fractional", "--effect=0.005", "--noise_std=0.0017", "--seeds=1")
    assert "this plan's --seeds=1 leaves no df to measure the noise" in capsys.readouterr().out


def test_power_plan_measures_the_noise_from_finished_runs(tmp_path, capsys):
    for s, loss in ((42, 3.700), (43, 3.704), (44, 3.702)):
        fake_run(tmp_path / "runs", f"base-s{s}", loss, seed=s)
    run_plan(tmp_path, "--effect=0.01", f"--noise_from={tmp_path / 'runs' / '*'}")
    assert "run-to-run std 0.002000 (pooled over the replicates of" in capsys.readouterr().out
    with pytest.raises(UsageError, match="needs the run-to-run noise"):
        run_plan(tmp_path / "x", "--effect=0.01")
    for flag in ("--effect=inf", "--noise_std=-1", "--hours_per_run=nan"):
        with pytest.raises(UsageError, match="must be a finite number, 0 or more"):
            run_plan(tmp_path / "y", "--effect=0.01", "--noise_std=0.002", flag)


def tiny_preset(tmp_path, **extra):
    """A preset of a tiny CPU run on shards from make_shards, with `extra` keys."""
    data = make_shards(tmp_path / "data")
    preset = tmp_path / "tiny.toml"
    preset.write_text(f"""n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\nvocab_size = 256\ndropout = 0.0
dataset = "syn"\ndata_dir = "{data}"\nbatch_size = 4\ntotal_batch_size = 128\nmax_tokens = 0
dtype = "float32"\ncompile = false\ndevice = "cpu"\nlog_interval = 1\neval_tokens = 256\ncharts = false\n"""
                      + "".join(f"{k} = {v}\n" for k, v in extra.items()))
    return preset


@pytest.mark.slow
def test_a_planned_sweep_runs_end_to_end_under_sh(tmp_path, monkeypatch):
    # as a new user would: sh (dash on Debian and Ubuntu), from another directory, with a PATH
    # whose python is not the project's; the script uses the interpreter that planned it
    preset = tiny_preset(tmp_path, max_iters=3, eval_interval=3)
    monkeypatch.chdir(tmp_path)
    sweep.main(["plan", "--factor", "grad_clip=0,0.5", "--seeds=2", f"--preset={preset}", "--out=sw"])
    env = {**os.environ, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["sh", str(tmp_path / "sw" / "run.sh")], cwd=tmp_path / "data", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["sw-00-baseline-s42", "sw-00-baseline-s43",
                                                    "sw-01-grad_clip0.5-s42", "sw-01-grad_clip0.5-s43"]
    assert all(os.path.isfile(tmp_path / "out" / d / "eval.json") for d in os.listdir(tmp_path / "out"))
    assert "paired t, 2 pairs" in done.stdout and "grad_clip=0.5" in done.stdout
    again = subprocess.run(["sh", "sw/run.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "starting" not in again.stdout  # finished runs are skipped
    # a run that fails stops the script there: no verdict is printed over a half-trained run
    os.remove(tmp_path / "out" / "sw-00-baseline-s43" / "eval.json")
    os.rename(tmp_path / "data", tmp_path / "moved")
    failed = subprocess.run(["sh", "sw/run.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "shards in" in failed.stderr and "group" not in failed.stdout


# --- several budgets from one WSD run per configuration and seed, and Slurm arrays ---------------


def test_a_budget_plan_branches_each_shorter_budget_and_prices_it_against_separate_runs(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text(open(os.path.join(ROOT, "config/tiny.toml")).read() + "cooldown_frac = 0.1\nwarmup_frac = 0.05\n")
    for cooldown, frac in ((None, 0.2), (str(preset), 0.1)):
        out = tmp_path / f"sw{frac}"
        names = sweep.main(["plan", "--factor", "grad_clip=0,1", "--budgets=1,0.25,0.5", f"--out={out}",
                            f"--preset={cooldown or os.path.join(ROOT, 'config/tiny.toml')}", "--hours_per_run=2"])
        printed = capsys.readouterr().out
        # per configuration and seed: the 100-step run, then the cooldowns of 25 and 50 steps only
        steps = [100, 25, 50]
        branched = (100 + sum(s - (s - round(frac * s)) for s in steps[1:])) / 100
        assert f"train {branched:.3f} runs' tokens instead of {sum(steps) / 100:.3f} for separate runs" in printed
        assert f"cost: {2 * branched:.2f} runs' tokens x 2 h x 1 GPU(s) = {4 * branched:,.1f} GPU-hours" in printed
        assert names == [f"sw{frac}-00-baseline", f"sw{frac}-00-baseline-b0.25", f"sw{frac}-00-baseline-b0.5",
                         f"sw{frac}-01-grad_clip1", f"sw{frac}-01-grad_clip1-b0.25", f"sw{frac}-01-grad_clip1-b0.5"]
        configs = [parse_config([str(out / f"{n}.toml")], [GPTConfig, TrainConfig], "train.py", "")[0][1]
                   for n in names]
        long, quarter, half = configs[:3]
        assert {c.lr_schedule for c in configs} == {"wsd"} and {c.warmup_iters for c in configs} == {
            5 if cooldown else 0}  # warmup_frac's 5 steps of 100, in steps: every branch shares them
        assert long.keep_steps == f"{25 - round(frac * 25)},{50 - round(frac * 50)}" and not long.branch_from
        assert (quarter.max_iters, quarter.branch_from, quarter.branch_step) == (25, f"out/{names[0]}",
                                                                                 25 - round(frac * 25))
        assert (half.max_iters, half.branch_step) == (50, 50 - round(frac * 50))
        script = (out / "run.sh").read_text()
        assert script.index(f"train.py {out}/{names[0]}.toml") < script.index(f"train.py {out}/{names[1]}.toml")
    with pytest.raises(UsageError, match="the largest 1"):
        sweep.main(["plan", "--factor", "grad_clip=0,1", "--budgets=0.25,0.5", f"--out={tmp_path / 'x'}"])
    with pytest.raises(UsageError, match="--budgets plans one-at-a-time designs"):
        sweep.main(["plan", "--factor", "grad_clip=0,1", "--budgets=0.5,1", "--design=full", f"--out={tmp_path / 'y'}"])


@pytest.mark.slow
def test_a_slurm_array_runs_its_tasks_and_a_branch_waits_for_its_parent(tmp_path, monkeypatch):
    preset = tiny_preset(tmp_path, max_iters=8, eval_interval=4, cooldown_frac=0.25)
    monkeypatch.chdir(tmp_path)
    names = sweep.main(["plan", "--factor", "grad_clip=0,0.5", "--budgets=0.5,1", f"--preset={preset}", "--out=sw",
                        "--launcher=slurm", "--torchrun=1"])
    assert names == ["sw-00-baseline", "sw-00-baseline-b0.5", "sw-01-grad_clip0.5", "sw-01-grad_clip0.5-b0.5"]
    script = (tmp_path / "sw" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "-m torch.distributed.run --standalone --nproc_per_node=1" in script
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWEEP_LAUNCH": sys.executable, "SWEEP_POLL": "0.2"}

    def task(i, **kw):
        return subprocess.Popen(["sh", "sw/sweep.sbatch"], cwd=tmp_path, env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    branch = task(1)  # the cooldown's task starts first and waits for its parent's kept checkpoint
    parent = task(0)
    for p in (parent, branch):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert "waiting for out/sw-00-baseline/ckpt_0000003.pt" in out  # 4 steps, branched at their cooldown's start
    assert all(os.path.isfile(tmp_path / "out" / n / "eval.json") for n in names[:2])  # tasks 2 and 3: the same
    with open(tmp_path / "out" / names[1] / "config.json") as f:
        assert json.load(f)["branch"]["from"] == "out/sw-00-baseline"
    again = task(0)
    assert again.communicate(timeout=600)[0].strip() == "out/sw-00-baseline has a test result: skipped"
    missing = task(4)
    assert missing.wait(timeout=60) == 2 and "no task 4 in this array (0-3)" in missing.stderr.read()
