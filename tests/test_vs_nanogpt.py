"""benchmarks/vs_nanogpt.py against a fake nanoGPT checkout: the flags it is given, its timings
parsed, our train.py run for real, and the table's arithmetic."""

import json
import os
import shutil
import sys

import pytest

from gpt_interventions.errors import run_main
from helpers import ROOT, cli

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import vs_nanogpt  # noqa: E402

# Logs the way nanoGPT's train.py does (iters 0..max_iters) at 100 ms a step, and records what it got.
FAKE_TRAIN = '''
import json, os, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
os.makedirs(eval(flags["out_dir"]), exist_ok=True)
with open(os.path.join(eval(flags["out_dir"]), "got.json"), "w") as f:
    json.dump({"flags": flags, "cwd": os.getcwd(),
               "malloc": [os.environ.get(f"MALLOC_{k}_THRESHOLD_") for k in ("MMAP", "TRIM")]}, f)
for i in range(int(flags["max_iters"]) + 1):
    print(f"iter {i}: loss 10.8000, time 100.00ms, mfu -100.00%")
'''
SMALL = ["--modes=fp32", "--iters=2", "--warmup=1", "--n_layer=1", "--n_head=2", "--n_embd=16",
         "--block_size=16", "--vocab_size=256", "--batch_size=2", "--accum=1", "--keep=True"]


@pytest.fixture
def fake_nanogpt(tmp_path):
    nano = tmp_path / "nanoGPT"
    nano.mkdir()
    (nano / "train.py").write_text(FAKE_TRAIN)
    (nano / "model.py").write_text("")
    (nano / "configurator.py").write_text("")
    return nano


def table(out):
    """{mode: (nanoGPT tok/s, ours tok/s, ratio)} from the printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 3)
        if len(parts) == 4 and parts[3].replace(".", "").isdigit():
            rows[parts[0].strip()] = tuple(float(p.replace(",", "")) for p in parts[1:])
    return rows


@pytest.mark.parametrize("nano_malloc", [False, True])
def test_side_by_side_runs_both_and_prints_the_ratio(fake_nanogpt, capsys, request, nano_malloc):
    run_main(vs_nanogpt.main, [str(fake_nanogpt)] + SMALL + [f"--nano_malloc={nano_malloc}"])
    out = capsys.readouterr().out
    work = out.strip().splitlines()[-1].removeprefix("work directory kept: ")
    request.addfinalizer(lambda: shutil.rmtree(work))
    rows = table(out)
    assert set(rows) == {"fp32", "equal (fp32, eager)", "best (fp32 vs fp32)"}
    nano, ours, ratio = rows["equal (fp32, eager)"]
    assert nano == 2 * 16 / 0.100  # tokens a step (batch 2 x block 16) at the fake's 100 ms
    # the ratio is printed to 2 decimals and ours to whole tokens/s: both roundings bound the gap
    assert ours > 0 and ratio == pytest.approx(ours / nano, abs=0.005 + 0.5 / nano + 1e-9)
    with open(os.path.join(work, "out_nanogpt_fp32_0", "got.json")) as f:
        got = json.load(f)
    assert got["cwd"] == str(fake_nanogpt)  # nanoGPT reads configurator.py from its directory
    flags = got["flags"]
    assert flags["device"] == "'cpu'" and flags["dtype"] == "'float32'" and flags["compile"] == "False"
    assert flags["bias"] == "True" and flags["dropout"] == "0.0" and flags["wandb_log"] == "False"
    assert flags["max_iters"] == "2"  # iters 0..2: 1 warm-up + 2 timed
    assert eval(flags["dataset"]).startswith(work)  # our random tokens, in nanoGPT's format
    assert got["malloc"] == ([str(2**31 - 1)] * 2 if nano_malloc else [None, None])
    with open(os.path.join(work, "out_ours_fp32_0", "config.json")) as f:
        ours_config = json.load(f)
    assert json.dumps(ours_config).count('"qkv_bias": true') == 1  # nanoGPT's bias=True, as ours


def test_not_a_checkout_is_one_line(tmp_path, capsys):
    code, err = cli(vs_nanogpt.main, [tmp_path], capsys)
    assert code == 2 and "is not a nanoGPT checkout" in err and err.count("\n") == 1
