"""compare.py and sweep.py's inputs: which runs are judged, on which loss: token budgets, the final
checkpoint's score, one split at a time, a baseline with a loss, and runs saved by older versions."""

import json
import os

import numpy as np
import pytest

import compare
import eval as eval_script
import train
from gpt_interventions.results import group_runs, load_runs
from gpt_interventions.verdicts import judge
from helpers import cli, fake_run, make_shards, replicates, snapshot, stop_after, tiny_flags


def test_each_token_budget_is_judged_on_its_own_paired_by_seed_with_holm_over_the_table(tmp_path, capsys):
    from scipy import stats as sp
    small, large = 1_000_000, 4_000_000
    noise = {42: 0.02, 43: -0.015, 44: 0.004}
    want = {"small": {}, "large": {}}  # arm -> losses by seed
    for s, e in noise.items():  # at the small budget the intervention helps; at the large one it does not
        want["small"].setdefault("base", []).append(3.90 + e)
        want["small"].setdefault("gc", []).append(3.85 + e + 0.001 * (s - 43))
        want["large"].setdefault("base", []).append(3.70 + e)
        want["large"].setdefault("gc", []).append(3.70 + e + 0.004 * (s - 43))
        fake_run(tmp_path, f"base-small-s{s}", want["small"]["base"][-1], seed=s, max_tokens=small)
        fake_run(tmp_path, f"gc-small-s{s}", want["small"]["gc"][-1], seed=s, max_tokens=small, grad_clip=3.5)
        fake_run(tmp_path, f"base-large-s{s}", want["large"]["base"][-1], seed=s, max_tokens=large)
        # the large budget's intervention runs given by steps, as branched cooldowns: 40 steps of 100,000
        out = fake_run(tmp_path, f"gc-large-s{s}", want["large"]["gc"][-1], seed=s, grad_clip=3.5, max_iters=40,
                       branch_from="out/x", branch_step=10, steps=40)
        meta = json.loads(open(os.path.join(out, "config.json")).read())
        meta["derived"]["tokens_per_step"] = large // 40
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(meta, f)
    fake_run(tmp_path, "gc-tiny", 4.2, grad_clip=3.5, max_tokens=250_000)  # no baseline at this budget
    runs = [str(tmp_path / "base-*"), str(tmp_path / "gc-*"), "--baseline=base-large-s42"]
    compare.main(runs + ["--json"])
    out = json.loads(capsys.readouterr().out)
    rows = {(r["budget"], r["group"]): r for r in out["rows"]}
    assert set(rows) == {(small, "baseline"), (small, "grad_clip=3.5"), (large, "baseline"), (large, "grad_clip=3.5")}
    p = {}
    for name, budget in (("small", small), ("large", large)):
        gc = rows[budget, "grad_clip=3.5"]
        p[name] = sp.ttest_rel(want[name]["gc"], want[name]["base"]).pvalue
        assert gc["paired"] and gc["p"] == pytest.approx(p[name], rel=1e-9) and gc["correction"] == "holm over 2"
        assert gc["delta"] == pytest.approx(np.mean(want[name]["gc"]) - np.mean(want[name]["base"]), rel=1e-9)
    first = min(p.values())  # Holm over the whole table: the smaller p times 2, the larger at least that
    assert rows[small, "grad_clip=3.5"]["p_adjusted"] == pytest.approx(min(1, 2 * p["small"]) if p["small"] == first
                                                                       else max(2 * first, p["small"]), rel=1e-9)
    assert rows[large, "grad_clip=3.5"]["p_adjusted"] == pytest.approx(min(1, 2 * p["large"]) if p["large"] == first
                                                                       else max(2 * first, p["large"]), rel=1e-9)
    assert rows[small, "grad_clip=3.5"]["verdict"] == "better" != rows[large, "grad_clip=3.5"]["verdict"]
    compare.main(runs)
    text = capsys.readouterr().out
    assert "budget (train tokens)" in text and "1,000,000" in text and "4,000,000" in text
    assert "not judged at 250,000 tokens: no run there in the baseline's configuration (base-large-s42's) has a loss" in text


def test_a_single_budget_has_no_budget_column(tmp_path, capsys):
    for s in (1, 2):
        fake_run(tmp_path, f"base-s{s}", 3.7 + s / 100, seed=s, max_tokens=1000)
        fake_run(tmp_path, f"gc-s{s}", 3.6 + s / 100, seed=s, max_tokens=1000, grad_clip=1.0)
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*"), "--json"])
    assert all("budget" not in r for r in json.loads(capsys.readouterr().out)["rows"])
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*")])
    assert "budget" not in capsys.readouterr().out


def scores(capsys, data, *models_and_flags):
    """eval.py's --json rows of MODEL [FLAGS...] calls, scored on syn/test."""
    rows = []
    for model, *flags in models_and_flags:
        capsys.readouterr()
        eval_script.main([model, f"--data_dir={data}", "--dataset=syn", "--ledger=", "--json", *flags])
        rows.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    return rows


def test_a_runs_test_loss_is_the_float32_score_of_its_final_checkpoint(tmp_path, capsys):
    # the review's case: scored at the final checkpoint, then an old snapshot and a bfloat16
    # re-score after it; neither may become the run's loss
    data = make_shards(tmp_path / "data", train=(4_000,))
    out = str(tmp_path / "run")
    train.main(tiny_flags(data, out, max_iters=6, checkpoint_interval=3, keep_checkpoints=2, run_name="run"))
    final, old, half = scores(capsys, data, (out,), (os.path.join(out, "ckpt_0000003.pt"),), (out, "--dtype=bfloat16"))
    assert (final["step"], old["step"]) == (6, 3) and old["loss"] != final["loss"] != half["loss"]
    run, = compare.load_runs([out])
    assert (run.loss, run.test_tokens, run.source) == (final["loss"], final["tokens"], "test")
    compare.main([out, "--json"])
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert (row["loss"], row["scored"]) == (final["loss"], "syn/test ckpt.pt step 6 float32 eval_tokens=0")
    # eval.json as eval.py wrote it before (one row per dataset/split) loads by the same rule
    for row, loss in ((final, final["loss"]), (old, None), (half, None)):
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump({"syn/test": row}, f)
        assert compare.load_runs([out])[0].loss == loss
    # a run with only another checkpoint's score is left out of the verdicts, in one line
    other = str(tmp_path / "other")
    os.makedirs(other)
    for name in ("config.json", "metrics.jsonl", "eval.json"):
        with open(os.path.join(out, name)) as f, open(os.path.join(other, name), "w") as g:
            g.write(f.read().replace('"run_name": "run"', '"run_name": "other"'))
    scores(capsys, data, (out,))
    compare.main([out, other])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:4] == ["other", "baseline", "42", "n/a"]
    assert (f"left out of the verdicts: other: no float32 syn/test score of its final checkpoint (ckpt.pt at "
            f"step 6), only of ckpt.pt step 6 bfloat16; score it: python eval.py {other} --dataset=syn") in lines


def test_a_score_taken_before_a_resume_is_not_the_runs(tmp_path, monkeypatch, capsys):
    data = make_shards(tmp_path / "data", train=(4_000,))
    out = str(tmp_path / "run")
    stop_after(monkeypatch, 2)  # stopped after step 3 of 6, scored there, then resumed to the end
    train.main(tiny_flags(data, out, max_iters=6))
    monkeypatch.undo()
    early, = scores(capsys, data, (out,))
    train.main(tiny_flags(data, out, max_iters=6))
    assert early["step"] == 3 and compare.load_runs([out])[0].loss is None
    final, = scores(capsys, data, (out,))
    assert final["step"] == 6 and compare.load_runs([out])[0].loss == final["loss"] != early["loss"]


def test_validation_losses_are_never_judged_with_test_losses(tmp_path, capsys):
    # the review's case: identical models whose validation loss reads 0.05 above their test loss;
    # the grad_clip group has no test rows
    for i, (e, d) in enumerate(((-0.001, 0.0004), (0.0, -0.0003), (0.0015, 0.0001))):
        fake_run(tmp_path, f"base-s{i}", 3.60 + e, rows=[{"step": 10, "val_loss": 3.65 + e}], seed=42 + i)
        fake_run(tmp_path, f"gc-s{i}", None, rows=[{"step": 10, "val_loss": 3.65 + e + d}], seed=42 + i, grad_clip=3.5)
    runs = [str(tmp_path / "base-*"), str(tmp_path / "gc-*")]
    compare.main([*runs, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [(r["group"], r["verdict"]) for r in out["rows"]] == [("baseline", "baseline")]  # gc is not judged
    assert out["split"] == out["rows"][0]["split"] == "test"
    assert [r["run"] for r in out["runs"] if r["left_out"]] == ["gc-s0", "gc-s1", "gc-s2"]
    compare.main(runs)
    text = capsys.readouterr().out
    assert "worse (holm" not in text and "left out of the verdicts: gc-s2: no float32 story/test score" in text
    compare.main([*runs, "--split=val", "--json"])  # or every run on its validation loss
    base, gc = json.loads(capsys.readouterr().out)["rows"]
    assert (base["split"], gc["split"], gc["verdict"]) == ("val", "val", "within noise")
    assert gc["delta"] == pytest.approx((0.0004 - 0.0003 + 0.0001) / 3)
    code, err = cli(compare.main, [*runs, "--split=val", "--reference=gpt2"], capsys)
    assert code == 2 and "--reference give test losses and --split=val" in err


def test_a_diverged_baseline_is_refused_and_no_other_row_is_the_baseline(tmp_path, capsys):
    fake_run(tmp_path, "base", float("nan"))
    replicates(tmp_path, "gc", 3.69, 0.002, grad_clip=3.5)
    runs = [str(tmp_path / "base"), str(tmp_path / "gc-*")]
    before = snapshot(tmp_path)
    for flags in ([], ["--json"]):
        code, err = cli(compare.main, [*runs, *flags], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert ("baseline base has no test loss to judge against (its test loss is nan (diverged)); name another "
                "with --baseline=RUN (runs with one: gc-s0, gc-s1, gc-s2)") in err
    assert snapshot(tmp_path) == before
    compare.main([*runs, "--baseline=gc-s1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["baseline"] == "gc-s1" and [r["verdict"] for r in out["rows"]] == ["baseline"]
    assert [(r["run"], r["left_out"]) for r in out["runs"] if r["left_out"]] == [("base", "its test loss is nan (diverged)")]
    runs = load_runs([str(tmp_path / "base"), str(tmp_path / "gc-*")])
    with pytest.raises(ValueError, match="baseline group has no values"):  # judge itself never labels another
        judge(group_runs(runs, runs[0]))


def test_a_branched_cooldowns_wall_time_and_speed_are_its_own():
    from gpt_interventions.results import FinishedRun
    rows = [{"step": 10, "tokens": 100, "dt_ms": 1000.0}, {"step": 20, "tokens": 200, "dt_ms": 2000.0}]
    branch = FinishedRun("b", "", {"branch_step": 10}, rows, 3.0, "test", None, 1)
    straight = FinishedRun("s", "", {"branch_step": 0}, rows, 3.0, "test", None, 1)
    assert (branch.wall_s, branch.own_tokens) == (20.0, 100)  # the parent's first 10 steps are not its own
    assert (straight.wall_s, straight.own_tokens) == (30.0, 200)


def test_a_run_saved_before_a_field_existed_groups_with_runs_that_leave_it_at_its_default(tmp_path, capsys):
    # config.json of a run made before moe_draws, parametrization and lr_schedule's cooldown existed
    # lacks those fields: they were off, so the run is a replicate of today's baseline, not a group
    for s, e in ((42, 0.0), (43, 0.004)):
        fake_run(tmp_path, f"new-s{s}", 3.70 + e, seed=s)
        fake_run(tmp_path, f"gc-s{s}", 3.69 + e, seed=s, grad_clip=3.5)
    old = fake_run(tmp_path, "old-s44", 3.702, seed=44)
    with open(os.path.join(old, "config.json")) as f:
        meta = json.load(f)
    for key in ("moe_draws", "parametrization", "mup_base_width"):
        del meta["model"][key]
    for key in ("cooldown_frac", "cooldown_shape", "keep_steps"):
        del meta["train"][key]
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(meta, f)
    compare.main([str(tmp_path / "*"), "--json", "--baseline=new-s42"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["group"], r["n"]) for r in rows] == [("baseline", 3), ("grad_clip=3.5", 2)]
