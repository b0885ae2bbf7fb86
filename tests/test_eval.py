"""eval.py: the test loss of any model, its records, and one-line errors for bad input."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
from gpt_interventions.errors import run_main
from gpt_interventions.evaluation import evaluate
from gpt_interventions.loader import eval_windows, read_windows
from gpt_interventions.shards import find_shards
from helpers import ROOT, VOCAB, eval_rows, make_shards, tiny_hf, tiny_run

WHOLE_TEST_SPLIT = (8_000 - 1) // 32 * 32  # make_shards' test shard in windows of block_size 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), train=(4_000,))


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    tiny_run(data_dir, out)
    return str(out)


def evaluate_cli(capsys, model, data_dir, ledger, *flags):
    """eval.main with --json; returns the printed row."""
    eval_script.main([model, f"--data_dir={data_dir}", "--dataset=syn", f"--ledger={ledger}", "--json", *flags])
    return json.loads(capsys.readouterr().out)


@pytest.mark.numerics
def test_loss_equals_what_transformers_computes_on_the_same_windows(data_dir, tmp_path, capsys):
    hf = tiny_hf(tmp_path / "hf")
    row = evaluate_cli(capsys, str(tmp_path / "hf"), data_dir, tmp_path / "results.jsonl", "--batch_size=5")
    windows = eval_windows(find_shards(data_dir, "syn", "test"), 32)
    x, y = read_windows(windows, 32, VOCAB)
    with torch.no_grad():
        logits = hf(torch.from_numpy(x)).logits
    expected = F.cross_entropy(logits.view(-1, VOCAB).double(), torch.from_numpy(y).view(-1)).item()
    assert row["tokens"] == len(windows) * 32 == WHOLE_TEST_SPLIT
    assert row["loss"] == pytest.approx(expected, rel=1e-6)
    assert row["source"] == "huggingface" and row["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_eval_is_bitwise_deterministic_and_recorded(data_dir, run_dir, tmp_path, capsys):
    ledger = tmp_path / "results.jsonl"
    a = evaluate_cli(capsys, run_dir, data_dir, ledger, "--eval_tokens=2048")
    b = evaluate_cli(capsys, run_dir, data_dir, ledger, "--eval_tokens=2048", "--batch_size=3")
    c = evaluate_cli(capsys, run_dir, data_dir, ledger, "--eval_tokens=2048")
    assert a["loss"] == c["loss"]  # bitwise
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)  # batching changes speed, not windows
    assert a["tokens"] == 2048 and 3 < a["loss"] < 6  # ln 256 = 5.5 at init
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["loss"] for r in rows] == [a["loss"], b["loss"], c["loss"]]
    first = rows[0]
    assert first["model"] == os.path.join(run_dir, "ckpt.pt") and first["step"] == 2
    assert first["config"]["model"]["n_embd"] == 32 and first["config"]["train"]["max_iters"] == 2
    assert (first["dataset"], first["split"], first["eval_tokens"], first["dtype"]) == ("syn", "test", 2048, "float32")
    assert {"seconds", "git_commit", "time"} <= set(first)
    # one row per checkpoint and settings (other tests score this run at other budgets): the batch size is speed only
    assert [r for r in eval_rows(run_dir) if r["eval_tokens"] == 2048 and r["dtype"] == "float32"] == [c]


def test_token_budget_scores_the_first_windows(data_dir, run_dir, tmp_path, capsys):
    from gpt_interventions.formats import load_model
    row = evaluate_cli(capsys, run_dir, data_dir, tmp_path / "r.jsonl", "--eval_tokens=100", "--split=val")
    assert row["tokens"] == 96 and row["eval_tokens"] == 100  # 3 whole windows of 32
    model, _ = load_model(run_dir)
    windows = eval_windows(find_shards(data_dir, "syn", "val"), 32)[:3]
    assert row["loss"] == pytest.approx(evaluate(model, windows, 8, "cpu")[0], rel=1e-12)


def test_the_line_it_prints(data_dir, run_dir, tmp_path, capsys):
    eval_script.main([run_dir, f"--data_dir={data_dir}", "--dataset=syn", f"--ledger={tmp_path / 'r.jsonl'}"])
    line = capsys.readouterr().out
    pattern = (r"syn/test loss (\d\.\d{6}) ppl (\d+\.\d\d) tokens 7,968 model "
               + re.escape(os.path.join(run_dir, "ckpt.pt")) + r" \(\d+\.\ds\)\n")
    match = re.fullmatch(pattern, line)
    assert match and float(match[2]) == pytest.approx(math.exp(float(match[1])), abs=0.01)


@pytest.mark.slow
def test_two_rank_torchrun_agrees_with_one_process(data_dir, run_dir, tmp_path, capsys):
    one = evaluate_cli(capsys, run_dir, data_dir, tmp_path / "one.jsonl", "--batch_size=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "eval.py", run_dir, f"--data_dir={data_dir}", "--dataset=syn", "--batch_size=4",
                           "--device=cpu", "--json", f"--ledger={tmp_path / 'two.jsonl'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # one JSON object: rank 0 prints alone
    assert two["world_size"] == 2 and two["tokens"] == one["tokens"] == WHOLE_TEST_SPLIT
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 1  # rank 0 writes alone


@pytest.fixture(scope="module")
def foreign(data_dir, tmp_path_factory):
    """Files that are not usable models, and a dataset with tokens beyond the tiny vocab."""
    root = tmp_path_factory.mktemp("foreign")
    torch.save({"weights": torch.zeros(2)}, root / "other.pt")
    (root / "empty").mkdir()
    make_shards(data_dir, dataset="wide", train=(100,), vocab=1000)
    return str(root)


BAD = [
    (["{tmp}/missing.pt"], "{tmp}/missing.pt not found"),
    (["{tmp}/missing.pt", "--dataset=nothere"], "{tmp}/missing.pt not found"),  # the model is named first
    (["{tmp}/run", "--data_dir={tmp}/nodata", "--dataset="], "{tmp}/run not found"),
    (["{foreign}/other.pt"], "is not a checkpoint written by train.py"),
    (["{foreign}/empty"], "holds neither ckpt.pt (a run), config.json (a Hugging Face model) nor model.json"),
    (["{run}", "--dataset=nothere"], "no test shards in"),
    (["{run}", "--dataset=wide"], "outside the model's vocab_size 256"),
    (["{run}", "--split=dev"], "split must be one of train, val, test"),
    (["{run}", "--eval_tokens=-5"], "--eval_tokens must be >= 0"),
    (["{run}", "--block_size=-1"], "--block_size must be >= 0"),
    (["{run}", "--block_size=64"], "--block_size=64 is longer than the model's block_size 32"),
    (["{run}", "--batch_size=0"], "--batch_size positive"),
    (["{run}", "--eval_token=5"], "unknown flag --eval_token (did you mean --eval_tokens?)"),
    (["{run}", "{run}"], "unexpected argument"),
    ([], "which model?"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, data_dir, run_dir, foreign, tmp_path, capsys):
    fill = dict(tmp=str(tmp_path), foreign=foreign, run=run_dir)
    before = sorted(os.listdir(run_dir))
    with pytest.raises(SystemExit) as e:
        run_main(eval_script.main, [f"--data_dir={data_dir}", "--dataset=syn", f"--ledger={tmp_path / 'results.jsonl'}"]
                 + [a.format(**fill) for a in argv])  # a later flag wins
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message.format(**fill) in err, err
    assert not (tmp_path / "results.jsonl").exists() and sorted(os.listdir(run_dir)) == before


def test_a_checkpoint_of_ours_is_scored_on_the_dataset_it_was_trained_on(data_dir, run_dir, tmp_path, capsys):
    make_shards(tmp_path, dataset="story", train=(100,), test=3_000)  # the default would score these
    implicit = evaluate_cli(capsys, run_dir, data_dir, tmp_path / "a.jsonl", "--dataset=")  # train.py's syn
    explicit = evaluate_cli(capsys, run_dir, data_dir, tmp_path / "b.jsonl")
    assert implicit["dataset"] == explicit["dataset"] == "syn"
    assert implicit["loss"] == explicit["loss"] and implicit["tokens"] == WHOLE_TEST_SPLIT
    other = evaluate_cli(capsys, run_dir, tmp_path, tmp_path / "c.jsonl", "--dataset=story")  # --dataset wins
    assert other["dataset"] == "story" and other["tokens"] == (3_000 - 1) // 32 * 32


def test_other_models_are_scored_on_the_story_dataset_by_default(data_dir, tmp_path, capsys):
    tiny_hf(tmp_path / "hf")
    with pytest.raises(SystemExit) as e:  # a GPT-2 directory: the story's test set, which data_dir lacks
        run_main(eval_script.main, [str(tmp_path / "hf"), f"--data_dir={data_dir}", "--ledger="])
    assert e.value.code == 2 and f"no test shards in {os.path.join(data_dir, 'story')}" in capsys.readouterr().err
    make_shards(tmp_path / "data", dataset="story", train=(100,))
    row = evaluate_cli(capsys, str(tmp_path / "hf"), tmp_path / "data", tmp_path / "r.jsonl", "--dataset=")
    assert row["dataset"] == "story" and row["tokens"] == WHOLE_TEST_SPLIT


def test_help_says_which_dataset_and_that_the_model_comes_first(capsys):
    with pytest.raises(SystemExit):
        eval_script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the one a checkpoint of ours was trained on, else story" in text
    assert "A local MODEL is read first, so a wrong path is named as such" in text


def test_script_prints_no_traceback(data_dir, tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", str(tmp_path / "nope.pt"), f"--data_dir={data_dir}",
                           "--dataset=syn"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'nope.pt'} not found\n"


def test_the_compiled_forward_path_of_evaluate_scores_as_nll_sum():
    # on a GPU a compiled model is scored from its forward's logits (faster there); the two paths
    # give the same sum up to float rounding (compiled or not, the forward is the same function)
    from gpt_interventions.evaluation import forward_nll_sum
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=300, pad_vocab=True)).eval()
    x, y = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    with torch.no_grad():
        assert forward_nll_sum(model, x, y).item() == pytest.approx(model.nll_sum(x, y).item(), rel=1e-6)
