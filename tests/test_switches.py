"""benchmarks/switches.py, the GPU check's table of every switch compiled, in its CPU dry mode
(tiny shapes, dynamo's capture without code generation): every row runs and is counted, a graph
break or an error fails its row without hiding the others, and the budget leaves rows listed."""

import os
import sys

import pytest
import torch

import model
from gpt_interventions.errors import run_main
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import switches  # noqa: E402

DRY = ["--device=cpu", "--tiny=True", "--backend=eager", "--budget=0", "--warmup=1", "--steps=1"]


def table(out):
    """The final table's rows as {(switch, dtype): {column: cell}}."""
    lines = out.split("the table (", 1)[1].splitlines()[3:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return {(r[0], r[1]): dict(zip(switches.HEADER, r)) for r in rows}


@pytest.mark.slow
def test_the_dry_mode_runs_every_switch_in_both_precisions_with_one_graph_each(capsys):
    run_main(switches.main, DRY)
    rows = table(capsys.readouterr().out)
    assert set(rows) == {(name, dtype) for name in switches.SWITCHES for dtype in ("bfloat16", "float16")}
    for key, row in rows.items():
        assert (row["status"], row["graphs"], row["graph breaks"]) == ("ok", "1", "0"), key
        assert float(row["max |compiled - eager| loss"]) < 1e-3 and float(row["tokens/s"].replace(",", "")) > 0, key


def test_a_graph_break_or_an_error_fails_its_row_and_the_rest_still_run(monkeypatch, capsys):
    def softcap_with_a_break(self, logits):
        torch._dynamo.graph_break()  # a no-op in eager; dynamo splits the graph here
        return logits
    monkeypatch.setattr(model.GPT, "softcap", softcap_with_a_break)
    monkeypatch.setitem(switches.SWITCHES, "impossible", ["--n_expert=2", "--expert_top_k=3"])
    with pytest.raises(SystemExit) as e:
        run_main(switches.main, [*DRY, "--only=baseline,impossible"])
    out = capsys.readouterr().out
    rows = table(out)
    assert e.value.code == 1 and "FAILED rows: baseline bfloat16, baseline float16, impossible" in out
    assert int(rows["baseline", "float16"]["graph breaks"]) > 0 and int(rows["baseline", "float16"]["graphs"]) > 1
    assert rows["impossible", "bfloat16"]["status"] == "FAILED: ValueError: expert_top_k 3 is not in 1..n_expert (2)"
    assert rows["impossible", "float16"]["status"].startswith("FAILED: ValueError")  # after two failed rows


def test_rows_past_the_budget_are_listed_as_not_run(capsys):
    run_main(switches.main, [*DRY, "--budget=0.01", "--only=qk_norm,baseline"])
    rows = table(capsys.readouterr().out)
    assert rows["baseline", "bfloat16"]["status"] == "ok"  # the most important row runs first
    for key in [("baseline", "float16"), ("qk_norm", "bfloat16"), ("qk_norm", "float16")]:
        assert rows[key]["status"] == "not run: the 0.01 s budget was spent", key


def test_bad_input_is_one_line(capsys):
    for argv in (["--only=nope"], ["--steps=0"]):
        with pytest.raises(SystemExit) as e:
            run_main(switches.main, [*DRY, *argv])
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
