"""compare.py, stats.py and charts.py: tables, noise floor, verdicts and charts."""

import json
import math
import os

import pytest

import compare
import eval as eval_script
import train
from gpt_interventions import charts, stats
from gpt_interventions.errors import UsageError
from helpers import ROOT, cli, eval_rows, fake_run, make_shards, replicates, snapshot, tiny_flags


@pytest.mark.parametrize("df, q", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281),
                                   (30, 2.0423), (math.inf, 1.9600)])
def test_t_quantiles_match_the_published_table(df, q):
    assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_welch_interval_by_hand():
    a, b = [3.60, 3.62, 3.64], [3.70, 3.71, 3.72]
    c = stats.welch(a, b)
    va, vb = 0.02 ** 2 / 3, 0.01 ** 2 / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    half = stats.t_quantile(0.975, df) * math.sqrt(va + vb)
    assert c.delta == pytest.approx(-0.09) and c.high == pytest.approx(-0.09 + half)
    assert c.verdict == "better" and c.test == f"Welch t, n=3 vs 3, df={df:.1f}"


def test_bootstrap_on_request_and_welch_otherwise():
    a, b = [3.6 + 0.001 * i for i in range(12)], [3.7 + 0.001 * i for i in range(12)]
    c = stats.compare(a, b, test="bootstrap")
    assert c.test.startswith("bootstrap") and "n=12 vs 12" in c.test and c.verdict == "better"
    assert c.low < -0.1 < c.high and c.p == 1 / 10_001  # every resample below 0: the smallest p it resolves
    assert stats.compare(a, b).test.startswith("Welch t, n=12 vs 12")



@pytest.mark.parametrize("spread, verdict", [(0.03, "within noise"), (0.01, "within noise"), (0.002, "better")])
def test_verdict_flips_to_better_as_the_replicate_spread_shrinks(tmp_path, capsys, spread, verdict):
    replicates(tmp_path, "base", 3.700, spread)
    replicates(tmp_path, "gc", 3.690, spread, first_seed=52, grad_clip=3.5)  # other seeds: unpaired
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*")])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gc-s0 +2"))
    assert "grad_clip=3.5" in row and f"{spread:.6f}" in row and "-0.010000" in row
    assert verdict in row and "Welch t, n=3 vs 3" in row


def test_single_runs_are_judged_with_another_groups_noise(tmp_path, capsys):
    fake_run(tmp_path, "base", 3.70)
    fake_run(tmp_path, "qkv", 3.60, qkv_bias=True)
    replicates(tmp_path, "wd", 3.65, 0.005, weight_decay=0.01)
    compare.main([str(tmp_path / "base"), str(tmp_path / "qkv"), str(tmp_path / "wd-*"), "--noise_from=wd-s1"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("qkv ")][-1]  # the groups table
    assert "better" in row and "t with std of weight_decay=0.01 (n=3), n=1 vs 1" in row
    compare.main([str(tmp_path / "base"), str(tmp_path / "qkv")])
    assert "no noise estimate" in capsys.readouterr().out
    with pytest.raises(UsageError, match="replicates"):
        compare.main([str(tmp_path / "base"), str(tmp_path / "qkv"), "--noise_from=qkv"])


def test_runtime_fields_do_not_make_an_intervention(tmp_path, capsys):
    rows = [{"step": 10, "tokens": 1000, "loss": 4.0, "dt_ms": 100.0},
            {"step": 20, "tokens": 2000, "loss": 3.9, "dt_ms": 300.0}]  # wall: 1 s + 3 s
    fake_run(tmp_path, "a", 3.7, rows=rows, world_size=2)
    fake_run(tmp_path, "b", 3.8, rows=rows, seed=7, batch_size=4, device="cpu", compile=False, charts=False,
             log_interval=5, weight_decay=0.0)
    compare.main([str(tmp_path / "*"), "--usd_per_hour=3600", "--baseline=a"])
    lines = capsys.readouterr().out.splitlines()
    a, b = lines[1].split(), lines[2].split()
    assert a == ["a", "baseline", "42", "3.700000", "+0.000000", "3.9000", "2,000", "0:00:04", "500", "8.00"]
    assert b[:5] == ["b", "weight_decay=0", "7", "3.800000", "+0.100000"] and b[-1] == "4.00"


def test_missing_runs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no run directories match"):
        compare.main([str(tmp_path / "nothing-*")])
    with pytest.raises(UsageError, match="not a readable run directory"):
        compare.main([str(tmp_path)])


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Two real tiny runs, one clipping hard, both evaluated on the test split by eval.py."""
    root = tmp_path_factory.mktemp("real")
    data = make_shards(root / "data", train=(4_000,))
    dirs = []
    for name, extra in (("base", {}), ("clip", {"grad_clip": 0.3})):
        out = str(root / name)
        train.main(tiny_flags(data, out, max_iters=6, eval_interval=3, run_name=name, **extra))
        eval_script.main([out, f"--data_dir={data}", "--dataset=syn", f"--ledger={root / 'results.jsonl'}"])
        dirs.append(out)
    return dirs


def test_table_and_markdown_on_real_runs(real_runs, tmp_path, capsys):
    capsys.readouterr()
    compare.main([*real_runs, "--markdown", f"--charts={tmp_path / 'charts'}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | interventions | seed | test loss | delta | train loss | tokens | wall | tok/s |"
    assert out[1] == "|---|---|---|---|---|---|---|---|---|"
    losses = [eval_rows(d)[0]["loss"] for d in real_runs]
    base, clip = out[2].split(" | "), out[3].split(" | ")
    assert base[:5] == ["| base", "baseline", "42", f"{losses[0]:.6f}", "+0.000000"]
    assert clip[:5] == ["| clip", "grad_clip=0.3", "42", f"{losses[1]:.6f}", f"{losses[1] - losses[0]:+.6f}"]
    assert clip[6] == "1,536"  # 6 steps x 256 tokens
    assert "no noise estimate" in out[-3] and out[-2].startswith("judged: test losses, eval.py's float32 score")
    assert out[-1].startswith("charts: ")
    for name in charts.CHARTS:
        with open(tmp_path / "charts" / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_charts_draw_one_series_per_run_and_mark_clipping(real_runs, tmp_path):
    runs = [charts.read_run(d) for d in real_runs]
    drawn = charts.save(runs, str(tmp_path))
    series = {os.path.basename(p): labels for p, labels in drawn.items()}
    assert series["train_loss.png"] == ["base (raw)", "base (smoothed)", "clip (raw)", "clip (smoothed)"]
    assert series["val_loss.png"] == ["base", "clip"] and series["lr.png"] == ["base", "clip"]
    clipped = sum(r.get("clipped", False) for r in runs[1][1])
    assert clipped > 0  # grad_clip=0.3 is below the norms of a fresh model
    assert series["grad_norm.png"] == ["base (pre-clip norm)", "clip (pre-clip norm)", "clip clip threshold 0.3",
                                       f"clip clipped steps ({clipped} logged)"]
    # and train.py drew each run's own charts when it finished
    assert sorted(os.listdir(os.path.join(real_runs[0], "charts"))) == sorted(f"{c}.png" for c in charts.CHARTS)


def ledger_row(model, loss, tokens=1024, block_size=1024, dataset="story", split="test", **extra):
    return {"model": model, "source": "huggingface", "dataset": dataset, "split": split, "loss": loss,
            "tokens": tokens, "config": {"model": {"block_size": block_size}}, **extra}


def test_reference_rows_come_from_the_ledger_scored_like_the_runs(tmp_path, capsys):
    fake_run(tmp_path, "base", 3.70)
    fake_run(tmp_path, "qkv", 3.60, qkv_bias=True)
    ledger = tmp_path / "results.jsonl"
    rows = [ledger_row("gpt2", 3.40, hub_id="gpt2"),
            ledger_row("openai-community/gpt2", 3.50, hub_id="openai-community/gpt2"),
            ledger_row("gpt2", 3.500123, hub_id="gpt2"),       # the latest matching row wins
            ledger_row("gpt2", 3.45, tokens=2048),             # later, but other tokens: other windows
            ledger_row("gpt2", 3.46, block_size=512),          # other context length
            ledger_row("gpt2", 3.47, split="val"),
            ledger_row("gpt2", 3.48, dataset="sample")]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in rows))
    compare.main([str(tmp_path / "base"), str(tmp_path / "qkv"), "--reference=gpt2, openai-community/gpt2",
                  f"--ledger={ledger}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split() == ["gpt2", "reference", "(eval.py)", "3.500123", "-0.199877"]
    assert lines[4].split() == ["openai-community/gpt2", "reference", "(eval.py)", "3.500000", "-0.200000"]
    assert lines[5] == ""  # then the groups table, which references do not join
    assert not any("reference" in line for line in lines[6:])


def test_a_long_context_reference_counts_on_the_runs_windows_only(tmp_path, capsys):
    # a 3,072-token model scored on its own windows is not comparable with 1,024-token runs; scored
    # with eval.py --block_size=1024 (the row's window) it is
    fake_run(tmp_path, "base", 3.70)
    ledger = tmp_path / "results.jsonl"
    ledger.write_text(json.dumps(ledger_row("long", 3.40, block_size=3072)) + "\n")
    code, err = cli(compare.main, [tmp_path / "base", "--reference=long", f"--ledger={ledger}"], capsys)
    assert code == 2 and "it has 1024 tokens at block_size 3072" in err
    with open(ledger, "a") as f:
        f.write(json.dumps(ledger_row("long", 3.60, block_size=3072, window=1024)) + "\n")
    compare.main([str(tmp_path / "base"), "--reference=long", f"--ledger={ledger}"])
    assert capsys.readouterr().out.splitlines()[2].split() == ["long", "reference", "(eval.py)", "3.600000",
                                                               "-0.100000"]


def test_reference_without_a_matching_row_says_how_to_score_it(tmp_path, capsys):
    fake_run(tmp_path, "base", 3.70)
    ledger = tmp_path / "results.jsonl"
    ledger.write_text(json.dumps(ledger_row("gpt2", 3.45, tokens=2048)) + "\n")
    before = snapshot(tmp_path)
    code, err = cli(compare.main, [tmp_path / "base", "--reference=gpt2", f"--ledger={ledger}"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "it has 2048 tokens at block_size 1024" in err
    assert f"python eval.py gpt2 --dataset=story --eval_tokens=1024 --ledger={ledger}" in err
    code, err = cli(compare.main, [tmp_path / "base", "--reference=gpt2", f"--ledger={tmp_path / 'none.jsonl'}"],
                    capsys)
    assert code == 2 and "does not exist: eval.py writes it" in err
    assert snapshot(tmp_path) == before


def test_reference_of_a_run_exported_to_hugging_face_scores_as_the_run(real_runs, tmp_path, capsys):
    # The same weights through eval.py's Hugging Face path: the reference's delta from its run is 0.
    hf, ledger = tmp_path / "hf", tmp_path / "results.jsonl"
    eval_script.main([real_runs[0], f"--export_hf={hf}"])
    data = os.path.join(os.path.dirname(real_runs[0]), "data")
    eval_script.main([str(hf), f"--data_dir={data}", "--dataset=syn", f"--ledger={ledger}"])
    capsys.readouterr()
    compare.main([*real_runs, f"--reference={hf}", f"--ledger={ledger}"])
    row = capsys.readouterr().out.splitlines()[3].split()
    assert row[0] == str(hf) and row[-1] == "+0.000000"


def test_json_rows_paired_and_corrected(tmp_path, capsys):
    seeds = {42: 0.02, 43: -0.015, 44: 0.004}
    for s, e in seeds.items():
        fake_run(tmp_path, f"base-s{s}", 3.70 + e, seed=s)
        fake_run(tmp_path, f"gc-s{s}", 3.695 + e + 0.0003 * (s - 43), seed=s, grad_clip=3.5)  # paired by seed
    fake_run(tmp_path, "qkv", 3.60, qkv_bias=True)  # one run: judged with the baseline's std
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*"), str(tmp_path / "qkv"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["correction"] == "holm" and out["baseline"] == "base-s42"
    base, gc, qkv = out["rows"]
    for row in out["rows"]:
        assert {"run", "group", "n", "mean", "delta", "ci_low", "ci_high", "p", "p_adjusted", "test", "verdict"} <= set(row)
    assert base["verdict"] == "baseline" and base["n"] == 3
    assert gc["paired"] and gc["test"].startswith("paired t, 3 pairs") and gc["verdict"] == "better"
    assert gc["unpaired"]["test"].startswith("Welch") and gc["unpaired"]["ci_high"] > 0 > gc["ci_high"]
    assert qkv["test"].startswith("t with std of baseline (n=3)") and not qkv.get("paired")
    assert gc["p_adjusted"] == pytest.approx(min(1, 2 * gc["p"])) or gc["p_adjusted"] == pytest.approx(
        max(2 * min(gc["p"], qkv["p"]), gc["p"]))  # Holm over the family of 2
    assert gc["correction"] == "holm over 2" and gc["detectable"] > 0


def test_the_storys_table_imported_judged_at_an_assumed_noise(capsys):
    table = os.path.join(ROOT, "assets", "story", "results.csv")
    compare.main([f"--results={table}", "--noise_std=0.0017", "--json"])
    out = json.loads(capsys.readouterr().out)
    rows = {r["run"]: r for r in out["rows"]}
    assert len(rows) == 15 and rows["baseline"]["verdict"] == "baseline"
    assert rows["gradient-clipping"]["delta"] == pytest.approx(-0.013209, abs=1e-9)
    # the batch-size series beside the interventions: each differs from the baseline in its tokens
    # per step alone (losses to three decimals, as reported)
    series = {"original": (6144, 3.944), "8xa100m40": (106496, 3.674), "8xh100m80": (221184, 3.725),
              "8xa100m80": (229376, 3.730), "8xb200m160": (524288, 3.771)}
    assert {name: (int(rows[name]["group"].removeprefix("total_batch_size=")), rows[name]["mean"])
            for name in series} == series
    assert rows["original"]["verdict"] == "worse" and rows["8xa100m40"]["verdict"] == "better"
    assert rows["stacked-interventions-1"]["group"] == ("dropout=0, learning_rate=0.0014, lr_schedule=story, "
                                                        "warmup_frac=0.05, min_lr=0.00014, weight_decay=0.01, grad_clip=3.5")
    assert out["references"] == [{"name": "GPT-2 small (original weights)", "loss": 3.5,
                                  "delta": pytest.approx(-0.191526)}]
    # at the speedrun's noise (0.0017 per run) every reported difference is beyond chance, Holm over 14
    assert all(r["verdict"] in ("better", "worse") and r["correction"] == "holm over 14" for r in out["rows"][1:])
    compare.main([f"--results={table}", "--noise_std=0.01", "--json"])  # at 0.01, the small gains are not
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["gradient-clipping"]["verdict"] == rows["no-amp"]["verdict"] == "within noise"
    assert rows["weight-tying"]["verdict"] == "worse" and rows["stacked-interventions-1"]["verdict"] == "better"


def test_bad_results_files_are_one_line(tmp_path, capsys):
    for text, message in (("run,test_loss\nbase,3.7\nclip,\n", "row 2: every row needs a run name and a test_loss"),
                          ("run,test_loss,grad_clip\nbase,3.7,\nclip,3.6,abc\n", "row 2: --grad_clip expects float"),
                          ("run,test_loss\nbase,x\n", "test_loss 'x' is not a number"),
                          ("run,test_loss\nbase,nan\n", "test_loss nan is not finite"),
                          ("run,test_loss\nbase,3.7,extra\n", "more cells than the header"),
                          ("run;test_loss\nbase;3.7\n", "(its columns: run;test_loss; give a comma-separated"),
                          ('{"run": "a", "test_loss": true}\n', "test_loss True is not a number"),
                          ('{"run": "a", "test_loss": 3.7, "tags": [1]}\n', "a value that is a list")):
        bad = tmp_path / ("r.jsonl" if text.startswith("{") else "r.csv")
        bad.write_text(text)
        code, err = cli(compare.main, [f"--results={bad}"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    bad = tmp_path / "bom.csv"  # a spreadsheet's export starts with a byte-order mark
    bad.write_bytes("\ufeffrun,test_loss,grad_clip\nbase,3.7,\nclip,3.6,3.5\n".encode("utf-8"))
    compare.main([f"--results={bad}", "--noise_std=0.01"])
    assert "grad_clip=3.5" in capsys.readouterr().out
    for flag in ("--noise_std=nan", "--noise_std=-1"):
        code, err = cli(compare.main, [f"--results={bad}", flag], capsys)
        assert code == 2 and "--noise_std must be a finite std" in err


def test_identical_repeats_report_zero_noise_and_no_verdict(tmp_path, capsys):
    for i in range(3):  # a deterministic machine: the same seed gives the same loss
        fake_run(tmp_path, f"base-r{i}", 3.70)
        fake_run(tmp_path, f"gc-r{i}", 3.69, grad_clip=3.5)
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*")])
    out = capsys.readouterr().out
    assert "noise: repeats (identical configs and seeds: the hardware) std 0.000000, df 4 (zero" in out
    row = next(line for line in out.splitlines() if line.startswith("gc-r0 +2"))
    assert "no noise estimate" in row and "better" not in row


def test_charts_draw_a_group_in_one_colour_with_its_spread(tmp_path, capsys):
    rows = lambda shift: [{"step": s, "tokens": 100 * s, "loss": 5.0 - 0.1 * s + shift, "lr": 1e-3,
                           "grad_norm": 1.0, "tok_per_s": 1e4} for s in range(1, 6)] + \
        [{"step": 5, "tokens": 500, "val_loss": 4.6 + shift}]
    for s, shift in ((42, 0.0), (43, 0.02)):
        fake_run(tmp_path, f"base-s{s}", 3.70 + shift, rows=rows(shift), seed=s)
    fake_run(tmp_path, "gc", 3.6, rows=rows(-0.1), grad_clip=3.5)
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc"), f"--charts={tmp_path / 'charts'}"])
    drawn = capsys.readouterr().out.splitlines()[-1]
    assert drawn.startswith("charts: ")
    labels = charts.save([charts.read_run(str(tmp_path / d)) + (g,) for d, g in
                          (("base-s42", "baseline"), ("base-s43", "baseline"), ("gc", "grad_clip=3.5"))],
                         str(tmp_path / "again"))
    val = labels[str(tmp_path / "again" / "val_loss.png")]
    assert val == ["_base-s42", "_base-s43", "baseline (mean of 2 runs, band: min-max)", "gc"]  # a lone run: its name


@pytest.mark.parametrize("groups,label", [(2, ", ".join(f"intervention_{i}=value_{i}" for i in range(20))),
                                          (8, "grad_clip=3.5"), (3, "a_flag_name_without_any_space_" * 12)])
def test_chart_legends_lie_inside_the_saved_figure_and_off_the_data(groups, label, tmp_path):
    import struct

    import matplotlib.pyplot as plt
    rows = lambda shift: [{"step": s, "tokens": 100 * s, "loss": 5.0 - 0.1 * s + shift, "lr": 1e-3, "grad_norm": 1.0,
                           "tok_per_s": 1e4, "clipped": True} for s in range(1, 6)] + \
        [{"step": 5, "tokens": 500, "val_loss": 4.6 + shift}]
    runs = [(f"run-{g}-s{s}", rows(0.1 * g + 0.01 * s), 0.5, f"{label} {g}" if g else "baseline")
            for g in range(groups) for s in range(2 if g % 2 == 0 else 1)]  # replicate groups and lone runs
    drawn = charts.save(runs, str(tmp_path))
    for chart, fig in charts.draw(runs).items():
        fig.canvas.draw()
        (ax,) = fig.axes
        legend = fig.legends[0] if fig.legends else ax.get_legend()
        box, page, data = legend.get_window_extent(), fig.bbox, ax.get_window_extent()
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, chart
        assert box.y1 <= ax.xaxis.label.get_window_extent().y0 < data.y0, chart  # below the axes and their label
        assert data.height > 200, chart  # the plot keeps its height however long the legend
        with open(tmp_path / f"{chart}.png", "rb") as f:  # and that figure is what was saved
            assert struct.unpack(">II", f.read(24)[16:24]) == (round(page.width), round(page.height))
        shown = ["".join(name.split()) for name in drawn[str(tmp_path / f"{chart}.png")] if not name.startswith("_")]
        assert ["".join(t.get_text().split()) for t in legend.get_texts()] == shown, chart  # wrapped, not cut
        plt.close(fig)
