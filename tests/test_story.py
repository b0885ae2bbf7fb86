"""The story's runs as presets and its data: the defaults are its baseline, every config/story/*.toml
names its reported loss (tests/test_story_runs.py checks each against the story's own run files),
and its token dataset imports and is read bit for bit as its code read it."""

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

import prepare_data
import train
from gpt_interventions import story_data
from gpt_interventions.evaluation import evaluate
from gpt_interventions.loader import TrainLoader, eval_windows
from gpt_interventions.shards import find_shards, read_shard
from gpt_interventions.tokenizer import EOT
from helpers import ROOT, cli, snapshot
from model import GPT, GPTConfig

def dry_run(argv, world_size, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    capsys.readouterr()
    train.main([*argv, "--dry_run"])
    return json.loads(capsys.readouterr().out)


def test_the_story_numbers(capsys, monkeypatch):
    # the figures the story's write-up gives: 163M parameters, 98,304 tokens per step, 33,165 steps
    # for 3,260,190,720 tokens rounded up; one GPU accumulates 8 micro-batches of 12 for the same step
    got = dry_run([], 1, capsys, monkeypatch)
    assert got["derived"]["num_params"] == 163_009_536
    assert (got["derived"]["accum"], got["derived"]["tokens_per_step"], got["derived"]["max_steps"]) == (8, 98_304, 33_165)
    assert got["derived"]["max_steps"] == -(-3_260_190_720 // 98_304)  # rounded up to whole steps
    best = dry_run([os.path.join(ROOT, "config", "best.toml")], 8, capsys, monkeypatch)
    assert (best["derived"]["accum"], best["derived"]["warmup_steps"]) == (1, 1658)


def test_the_defaults_are_the_storys_baseline(capsys, monkeypatch):
    defaults = dry_run([], 8, capsys, monkeypatch)
    baseline = dry_run([os.path.join(ROOT, "config", "baseline.toml")], 8, capsys, monkeypatch)
    story = dry_run([os.path.join(ROOT, "config", "story", "baseline.toml")], 8, capsys, monkeypatch)
    for got in (baseline, story):
        assert got["model"] == defaults["model"] and got["derived"] == defaults["derived"]
        assert {k: v for k, v in got["train"].items() if k not in ("run_name", "out_dir")} == \
            {k: v for k, v in defaults["train"].items() if k not in ("run_name", "out_dir")}


def test_every_preset_names_its_reported_loss():
    reported = {"baseline": "3.691526", "gradient-clipping": "3.678317", "qkv-bias": "3.669385",
                "weight-decay-gpt2": "3.642940", "weight-decay-cerebras": "3.813856", "remove-dropout": "3.641282",
                "schedule-learning-rate": "3.601917", "weight-tying": "3.874305", "no-amp": "3.678968",
                "stacked-interventions-1": "3.577761",
                # the batch-size series, reported to three decimals
                "original": "3.944", "8xa100m40": "3.674", "8xh100m80": "3.725", "8xa100m80": "3.730",
                "8xb200m160": "3.771"}
    presets = sorted(p[:-5] for p in os.listdir(os.path.join(ROOT, "config", "story")))
    assert len(presets) == 36 and set(reported) < set(presets)
    for name in presets:
        with open(os.path.join(ROOT, "config", "story", f"{name}.toml")) as f:
            head = " ".join(line.removeprefix("# ") for line in f.read().split("\n")[:2])
        assert f"run {name} (" in head, name
        assert f"reported test loss {reported[name]}" in head if name in reported else \
            "test loss not reported" in head, name


def test_each_row_of_the_results_table_is_its_preset_with_its_loss(capsys, monkeypatch):
    # assets/story/results.csv (compare.py --results) names each run's differences from the baseline:
    # the same config as config/story/NAME.toml, and the loss that preset's header reports
    from gpt_interventions.results import IGNORED, import_results
    runs, _ = import_results(os.path.join(ROOT, "assets", "story", "results.csv"))
    assert len(runs) == 15
    for run in runs:
        preset = os.path.join(ROOT, "config", "story", f"{run.name}.toml")
        got = dry_run([preset], 1, capsys, monkeypatch)
        config = {**got["model"], **got["train"]}
        assert {k: v for k, v in config.items() if k not in IGNORED} == \
            {k: v for k, v in run.config.items() if k not in IGNORED}, run.name
        with open(preset) as f:
            head = " ".join(line.removeprefix("# ") for line in f.read().split("\n")[:2])
        assert float(re.search(r"reported test loss (\d\.\d+)", head).group(1)) == run.loss, run.name


def test_dry_run_reads_no_data_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: a real run would refuse at once
    got = dry_run(["--out_dir=run"], 1, capsys, monkeypatch)
    assert got["train"]["out_dir"] == "run" and os.listdir(tmp_path) == []
    assert got["derived"]["run_flops"] == got["derived"]["flops_per_token"] * 98_304 * 33_165
    monkeypatch.setenv("WORLD_SIZE", "eight")
    code, err = cli(train.main, ["--dry_run"], capsys)
    assert code == 2 and "WORLD_SIZE='eight'" in err and err.count("\n") == 1


# --- the story's data: gpjt/fineweb-gpt2-tokens -----------------------------------------------

def story_files(root, train=30_000, validation=12_000, dtype=np.uint16, name="tokens"):
    """A small fake of the story's dataset: two safetensors files, one uint16 vector each, with an
    <|endoftext|> after every 'document' of 100 tokens."""
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, n, seed in (("train", train, 1), ("validation", validation, 2)):
        tokens = np.random.default_rng(seed).integers(0, 256, n).astype(dtype)
        tokens[99::100] = EOT if dtype == np.uint16 else 0
        save_file({name: tokens}, os.path.join(root, f"{split}.safetensors"))
        out[split] = tokens
    return out


SMALL = ["--test_offset=5000", f"--test_tokens={4 * 1024 + 1}", "--val_tokens=3000", "--shard_tokens=7000"]


def import_story(tmp_path, *flags, story=None):
    data = tmp_path / "data"
    prepare_data.main(["--dataset=story", f"--input={story or tmp_path / 'story'}", f"--data_dir={data}", *flags])
    return str(data)


def split_tokens(data_dir, split):
    return np.concatenate([read_shard(p) for p, _ in find_shards(data_dir, "story", split)])


def test_story_import_is_bit_exact(tmp_path):
    tokens = story_files(tmp_path / "story")
    data_dir = import_story(tmp_path, *SMALL)
    assert np.array_equal(split_tokens(data_dir, "train"), tokens["train"])  # in order, across 5 shards
    assert len(find_shards(data_dir, "story", "train")) == 5
    assert np.array_equal(split_tokens(data_dir, "val"), tokens["validation"][:3000])
    assert np.array_equal(split_tokens(data_dir, "test"), tokens["validation"][5000:5000 + 4097])
    with open(os.path.join(data_dir, "story", "meta.json")) as f:
        meta = json.load(f)
    assert meta["source"] == {"kind": "local", "input": str(tmp_path / "story")}
    assert meta["splits"]["train"]["documents"] == 300 and meta["splits"]["test"]["tokens"] == 4097
    capped = import_story(tmp_path / "capped", "--max_tokens=12345", *SMALL, story=tmp_path / "story")
    assert np.array_equal(split_tokens(capped, "train"), tokens["train"][:12345])


def test_story_import_reads_the_files_a_slice_at_a_time(tmp_path, monkeypatch):
    tokens = story_files(tmp_path / "story")
    monkeypatch.setattr(story_data, "SLICE", 777)  # slices that cut shards and splits anywhere
    data_dir = import_story(tmp_path, "--max_tokens=20001", *SMALL)
    assert np.array_equal(split_tokens(data_dir, "train"), tokens["train"][:20001])
    assert np.array_equal(split_tokens(data_dir, "test"), tokens["validation"][5000:5000 + 4097])


def test_story_defaults_are_its_offsets():
    cfg = prepare_data.PrepConfig(dataset="story")
    assert story_data.budgets(cfg) == (10 * 2**20, 50_000_000, 19_660_801)
    # eval.py at block 1024 scores 19,200 windows of that test split: 19,660,800 tokens, the story's
    # 3,200 batches of 6 x 1,024
    windows = eval_windows([("test", 19_660_801)], 1024)
    assert len(windows) == 19_200 == 3_200 * 6 and windows[-1][1] + 1024 + 1 == 19_660_801


def test_eval_scores_the_storys_test_batches(tmp_path):
    tokens = story_files(tmp_path / "story")
    data_dir = import_story(tmp_path, *SMALL)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=1024, vocab_size=50257, dropout=0.0)).eval()
    windows = eval_windows(find_shards(data_dir, "story", "test"), 1024)
    loss, scored = evaluate(model, windows, 2, "cpu")
    # the story's test_loss.py: batches of rows of the validation tokens from the offset, inputs a
    # row, targets the same row shifted by one; the mean of the batch means
    val = torch.from_numpy(tokens["validation"].astype(np.int64))
    rows = [val[5000 + r * 1024: 5000 + r * 1024 + 1025] for r in range(4)]
    means = []
    for b in range(0, 4, 2):
        x = torch.stack([r[:-1] for r in rows[b:b + 2]])
        y = torch.stack([r[1:] for r in rows[b:b + 2]])
        with torch.no_grad():
            means.append(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item())
    assert scored == 4 * 1024 and loss == pytest.approx(sum(means) / len(means), rel=1e-6)


@pytest.mark.parametrize("ranks, accum", [(8, 1), (1, 8), (2, 4)])
def test_each_step_trains_on_the_storys_tokens_of_that_step(tmp_path, ranks, accum):
    tokens = story_files(tmp_path / "story")
    data_dir = import_story(tmp_path, *SMALL)
    B, T = 2, 16
    per_step = ranks * accum * B * T
    shards = find_shards(data_dir, "story", "train")
    loaders = [TrainLoader(shards, per_step, B, T, accum, r, ranks, 0, 50257) for r in range(ranks)]
    stream = tokens["train"].astype(np.int64)
    for step in range(5):
        ours, theirs = {}, {}
        for r in range(ranks):
            for a in range(accum):
                x, y = loaders[r].batch(step, a)
                ours[(r, a)] = (x.tobytes(), y.tobytes())
                # the story's code: micro-batch ((step * accum) + accumulation step) * ranks + rank
                # of rows of B x T tokens from the start, targets shifted by one
                m = (step * accum + a) * ranks + r
                row = stream[m * B * T: (m + 1) * B * T + 1]
                theirs[(r, a)] = (row[:-1].reshape(B, T).tobytes(), row[1:].reshape(B, T).tobytes())
        assert sorted(ours.values()) == sorted(theirs.values())  # the step's tokens are the story's
        if ranks == 1 or accum == 1:  # the story's runs: and each rank and micro-batch has the same rows
            assert ours == theirs


@pytest.mark.parametrize("bad, message", [
    (dict(name="ids"), "holds ids, not the vector `tokens`"),
    (dict(shard_tokens=4000), "--shard_tokens=4000 would split the test split of 4,097 tokens"),
    (dict(dtype=np.int32), "train.safetensors: `tokens` is I32 of shape [30000], not a uint16 vector"),
    (dict(validation=9000), "holds 9,000 tokens, too few for the test split at [5,000, 9,097)"),
])
def test_bad_story_files_are_one_line_and_write_nothing(tmp_path, capsys, bad, message):
    shard = bad.pop("shard_tokens", 7000)
    story_files(tmp_path / "story", **bad)
    data = tmp_path / "data"
    code, err = cli(prepare_data.main, ["--dataset=story", f"--input={tmp_path / 'story'}", f"--data_dir={data}",
                                        *SMALL, f"--shard_tokens={shard}"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not data.exists() or snapshot(data) == {}


def test_story_from_the_hub_is_pinned_and_offline_names_the_local_route(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    story_files(tmp_path / "story")
    calls = []

    class Api:
        def dataset_info(self, repo, revision=None):
            calls.append(("info", repo, revision))
            return type("Info", (), {"sha": "e" * 40})()

    def download(repo, filename, repo_type=None, revision=None):
        calls.append(("download", repo, filename, repo_type, revision))
        return str(tmp_path / "story" / filename)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    data = tmp_path / "data"
    prepare_data.main(["--dataset=story", f"--data_dir={data}", *SMALL])
    assert calls == [("info", "gpjt/fineweb-gpt2-tokens", "main"),
                     *[("download", "gpjt/fineweb-gpt2-tokens", f, "dataset", "e" * 40)
                       for f in ("train.safetensors", "validation.safetensors")]]
    with open(data / "story" / "meta.json") as f:
        assert json.load(f)["source"]["revision_sha"] == "e" * 40
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli(prepare_data.main, ["--dataset=story", f"--data_dir={tmp_path / 'other'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "gpjt/fineweb-gpt2-tokens" in err and "--input=DIR" in err
