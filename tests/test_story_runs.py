"""The story's run directories as presets (gpt_interventions/story_runs.py): every directory of
../shared/story/runs resolves through `train.py DIR --dry_run` to the run that its files describe,
read as the story's code read them, and config/story/ holds the same run under its name; his
long-context and expert runs train, evaluate and sample at tiny width on the CPU from their files."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import sample
import train
from gpt_interventions import eval_results, microbatch
from gpt_interventions.formats import load_model
from gpt_interventions.shards import read_shard
from helpers import ROOT, cli, make_shards, read_metrics

RUNS = os.path.join(ROOT, "..", "shared", "story", "runs")
ASSETS = os.path.join(ROOT, "assets", "story", "runs")
NAMES = sorted(os.listdir(RUNS)) if os.path.isdir(RUNS) else [pytest.param(None, marks=pytest.mark.skip(
    reason=f"{RUNS} is absent: the story's run directories come beside the clone, in shared/story/runs"))]
# the keys that change nothing computed: where the run checkpointed, validated and logged
IGNORED = {"checkpoint_interval", "validation_interval", "validation_batches", "start_val_token",
           "log_moe_balance_file"}


def preset_of(name):
    """The config/story/ preset of run `name`: the 8-GPU runs of the interventions post without
    their machine (8xa100m40-baseline: baseline), every other run under its own name."""
    return name.split("-", 1)[1] if name.startswith("8x") and "-" in name else name


def story_run(name):
    """What the story's code trained for run `name`, from its JSON files, by the rules of its code
    (shared/story/README.md): defaults where a key is absent, tokens per step from the GPUs its name
    says (original and test: one), warmup steps floored, eta_min lr / 10, float16 autocast with TF32
    unless use_amp is false, seed 42 unless random_seed; the ignored keys and their values."""
    with open(os.path.join(RUNS, name, "model.json")) as f:
        m = json.load(f)
    with open(os.path.join(RUNS, name, "train.json")) as f:
        t = json.load(f)
    moe = m.get("moe", {})
    assert set(t) <= {"microbatch_size", "gradient_accumulation_steps", "min_train_tokens", "learning_rate",
                      "weight_decay", "clipping_max_norm", "use_amp", "schedule_learning_rate",
                      "warmup_period_percent", "random_seed", "dataset", "start_train_token"} | IGNORED, name
    assert set(m) <= {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias",
                      "tie_weights", "moe"}, name
    assert set(moe) <= {"num_experts", "num_active_experts"} | IGNORED, name
    assert t["dataset"] == "gpjt/fineweb-gpt2-tokens" and t["start_train_token"] == 0, name
    gpus = {"original": 1, "test": 1}.get(name) or int(re.match(r"(\d+)x", name).group(1))
    micro, accum = t["microbatch_size"], t.get("gradient_accumulation_steps", 1)
    per_step = gpus * micro * accum * m["context_length"]
    steps = -(-t["min_train_tokens"] // per_step)
    lr = t.get("learning_rate", 0.0004)
    scheduled = t.get("schedule_learning_rate", False)
    amp = t.get("use_amp", True)
    model = {"vocab_size": m["vocab_size"], "block_size": m["context_length"], "n_embd": m["emb_dim"],
             "n_head": m["n_heads"], "n_layer": m["n_layers"], "dropout": m["drop_rate"],
             "qkv_bias": m["qkv_bias"], "tie_weights": m.get("tie_weights", False), "init": "torch",
             "position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
             "n_expert": moe.get("num_experts", 0), "expert_top_k": moe.get("num_active_experts", 1),
             **({"moe_draws": "story"} if moe else {})}
    trained = {"dataset": "story", "batch_size": micro, "total_batch_size": per_step, "learning_rate": lr,
               "lr_schedule": "story" if scheduled else "constant", "weight_decay": t.get("weight_decay", 0.1),
               "decay_params": "all", "optimizer": "adamw", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
               "grad_clip": t.get("clipping_max_norm", 0.0), "dtype": "float16" if amp else "float32",
               "tf32": amp, "seed": t.get("random_seed", 42), "max_iters": 0, "moe_aux_loss": 0.0, "z_loss": 0.0}
    if scheduled:
        trained["min_lr"] = lr / 10
    derived = {"ranks": gpus, "micro_batch": micro, "accum": accum, "tokens_per_step": per_step,
               "max_steps": steps, "warmup_steps": steps * t.get("warmup_period_percent", 0) // 100 if scheduled else 0}
    ignored = {k: v for k, v in {**t, **m, **moe}.items() if k in IGNORED}
    return gpus, model, trained, derived, ignored


def dry_run(argv, world_size, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    capsys.readouterr()
    train.main([*argv, "--dry_run"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", NAMES)
def test_each_run_directory_resolves_to_its_run_and_its_preset_is_the_same(name, capsys, monkeypatch):
    gpus, model, trained, derived, ignored = story_run(name)
    got = dry_run([os.path.join(RUNS, name)], gpus, capsys, monkeypatch)
    assert {k: got["model"][k] for k in model} == model
    assert {k: got["train"][k] for k in trained} == trained
    assert {k: got["derived"][k] for k in derived} == derived
    assert got["train"]["run_name"] == name
    assert got["story_runs"] == [{"dir": os.path.join(RUNS, name), "gpus": gpus, "ignored": ignored}]
    # config/story/ holds the same run under its name: every field, not only those above
    preset = dry_run([os.path.join(ROOT, "config", "story", f"{preset_of(name)}.toml")], gpus, capsys, monkeypatch)
    assert preset["train"]["run_name"] == preset_of(name)
    for key in ("run_name", "out_dir"):
        del got["train"][key], preset["train"][key]
    assert (preset["model"], preset["train"], preset["derived"]) == (got["model"], got["train"], got["derived"])
    if os.path.isdir(os.path.join(ASSETS, name)):  # the copies the project carries are the same files
        for file in ("model.json", "train.json"):
            with open(os.path.join(ASSETS, name, file), "rb") as a, open(os.path.join(RUNS, name, file), "rb") as b:
                assert a.read() == b.read(), (name, file)


@pytest.mark.skipif(not os.path.isdir(RUNS), reason=f"{RUNS} is absent")
def test_config_story_is_the_whole_record():
    presets = {p[:-len(".toml")] for p in os.listdir(os.path.join(ROOT, "config", "story"))}
    assert presets == {preset_of(name) for name in os.listdir(RUNS)} and len(presets) == 36


def run_dir(tmp_path, name="8xa100m40-baseline", model=None, train_=None, drop=()):
    """A copy of one of his run directories (from the project's own copies), its files edited."""
    path = tmp_path / name
    shutil.copytree(os.path.join(ASSETS, "8xa100m40-baseline"), path)
    for file, changes in (("model.json", model or {}), ("train.json", train_ or {})):
        with open(path / file) as f:
            data = json.load(f)
        data.update(changes)
        for key in drop:
            data.pop(key, None)
        (path / file).write_text(json.dumps(data))
    return str(path)


def test_run_directories_stack_with_presets_and_flags_in_order(tmp_path, capsys, monkeypatch):
    baseline = os.path.join(ASSETS, "8xa100m40-baseline")
    qkv = os.path.join(ROOT, "config", "story", "qkv-bias.toml")
    tiny = os.path.join(ROOT, "config", "tiny.toml")
    defaults = dry_run([], 8, capsys, monkeypatch)
    assert dry_run([baseline, qkv], 8, capsys, monkeypatch)["model"] == dry_run([qkv], 8, capsys, monkeypatch)["model"]
    over = dry_run([tiny, baseline], 8, capsys, monkeypatch)  # the directory sets every field of his run
    assert over["model"] == defaults["model"] and over["derived"] == defaults["derived"]
    flagged = dry_run([baseline, "--n_layer=2", "--qkv_bias=True"], 8, capsys, monkeypatch)
    assert (flagged["model"]["n_layer"], flagged["model"]["qkv_bias"], flagged["train"]["run_name"]) == \
        (2, True, "8xa100m40-baseline")
    # one GPU: the same tokens per step, accumulated
    one = dry_run([baseline], 1, capsys, monkeypatch)["derived"]
    assert (one["accum"], one["tokens_per_step"], one["max_steps"]) == (8, 98_304, 33_165)


def test_a_name_without_its_gpus_needs_total_batch_size(tmp_path, capsys, monkeypatch):
    path = run_dir(tmp_path, "mine", train_={"gradient_accumulation_steps": 2})
    code, err = cli(train.main, [path, "--dry_run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "how many GPUs ran it?" in err
    assert "give --total_batch_size=GPUS*24576" in err
    got = dry_run([path, "--total_batch_size=49152"], 1, capsys, monkeypatch)  # two GPUs' worth
    assert (got["derived"]["accum"], got["derived"]["tokens_per_step"]) == (4, 49_152)
    assert got["story_runs"][0]["gpus"] is None
    # a prefix says it, whatever the rest of the name; no GPUs is no count
    assert dry_run([run_dir(tmp_path, "4xmine")], 1, capsys, monkeypatch)["derived"]["tokens_per_step"] == 49_152
    code, err = cli(train.main, [run_dir(tmp_path, "0xmine"), "--dry_run"], capsys)
    assert code == 2 and "how many GPUs ran it?" in err
    os.remove(os.path.join(path, "train.json"))
    code, err = cli(train.main, [path, "--dry_run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a directory without train.json" in err


@pytest.mark.parametrize("edit, message", [
    (dict(train_={"max_lr": 1}), "train.json: unknown key 'max_lr'; train.py reads microbatch_size"),
    (dict(model={"rope": True}), "model.json: unknown key 'rope'"),
    (dict(model={"moe": {"num_experts": 4, "num_active_experts": 2, "capacity": 1}}), "moe: unknown key 'capacity'"),
    (dict(drop=("microbatch_size",)), "train.json: microbatch_size is missing"),
    (dict(model={"emb_dim": "768"}), "model.json: emb_dim must be a whole number, got '768'"),
    (dict(train_={"use_amp": 1}), "train.json: use_amp must be true or false, got 1"),
    (dict(train_={"gradient_accumulation_steps": 0}), "gradient_accumulation_steps must be at least 1, got 0"),
    (dict(train_={"dataset": "someone/else"}), "dataset 'someone/else' is not the story's gpjt/fineweb-gpt2-tokens"),
    (dict(train_={"start_train_token": 1000}), "start_train_token 1000 is not 0"),
])
def test_bad_run_directories_are_refused_in_one_line(tmp_path, capsys, edit, message):
    path = run_dir(tmp_path, **edit)
    code, err = cli(train.main, [path, "--dry_run"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


# --- his long-context and expert runs, end to end at tiny width on the CPU ---------------------

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--dataset=syn", "--max_tokens=0", "--dtype=float32",
        "--compile=False", "--device=cpu", "--log_interval=1", "--charts=False"]


def reference_loss(model, tokens, T):
    """Mean next-token cross-entropy over the non-overlapping windows of T + 1 tokens of `tokens`."""
    n = (len(tokens) - 1) // T
    rows = torch.from_numpy(tokens[:n * T + 1].astype(np.int64))
    x = torch.stack([rows[i * T:(i + 1) * T] for i in range(n)])
    y = torch.stack([rows[i * T + 1:(i + 1) * T + 1] for i in range(n)])
    with torch.no_grad():
        return F.cross_entropy(model(x)[0].flatten(0, 1).double(), y.flatten()).item(), n * T


def scored(run, data, capsys, *flags):
    capsys.readouterr()
    eval_script.main([run, "--dataset=syn", f"--data_dir={data}", "--ledger=", "--json", "--device=cpu", *flags])
    return json.loads(capsys.readouterr().out)


def test_the_storys_test_split_is_the_same_tokens_in_3072_token_windows():
    # 19,660,801 test tokens: 19,200 windows of 1,024 or 6,400 of 3,072, the same 19,660,800 targets
    from gpt_interventions.loader import eval_windows
    long, short = eval_windows([("test", 19_660_801)], 3072), eval_windows([("test", 19_660_801)], 1024)
    assert (len(long), len(short), len(long) * 3072) == (6_400, 19_200, len(short) * 1024)


@pytest.mark.skipif(not os.path.isdir(RUNS), reason=f"{RUNS} is absent")
def test_the_context_extension_run_trains_evaluates_and_samples_at_3072(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    out = str(tmp_path / "long")
    # his directory (context 3,072, learned positions, micro-batches of 1) at tiny width: 2 steps of 2 x 3,072
    train.main([os.path.join(RUNS, "1xrtx3090-context-extension"), *TINY, "--vocab_size=256", f"--data_dir={data}",
                f"--out_dir={out}", "--total_batch_size=6144", "--max_iters=2", "--eval_tokens=3072"])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["model"]["block_size"], config["model"]["position"], config["derived"]["accum"]) == \
        (3072, "learned", 2)
    assert [r["val_tokens"] for r in read_metrics(out) if "val_loss" in r] == [3072]
    assert config["story_runs"][0]["ignored"] == {"checkpoint_interval": 617, "start_val_token": 0}
    assert (f"preset {RUNS}/1xrtx3090-context-extension: the story's run on 1 GPU(s); ignored, as they change "
            "nothing here: checkpoint_interval=617, start_val_token=0") in open(os.path.join(out, "log.txt")).read()
    model, _ = load_model(out)
    assert model.transformer.wpe.weight.shape == (3072, 32)
    test = read_shard(os.path.join(data, "syn", "test_000000.bin"))
    own, wide = scored(out, data, capsys), scored(out, data, capsys, "--block_size=1024")
    # its own windows: 2 of 3,072 tokens in the 8,000-token split; --block_size=1024: 7 of 1,024
    for got, T in ((own, 3072), (wide, 1024)):
        loss, tokens = reference_loss(model, test, T)
        assert got["tokens"] == tokens and got["loss"] == pytest.approx(loss, rel=1e-6)
    assert "window" not in own and wide["window"] == 1024
    # eval.json keeps both; the run's result (compare.py's) is the score on its own windows
    rows = eval_results.read(out)
    assert sorted(eval_results.key(r) for r in rows) == ["syn/test ckpt.pt step 2 float32 eval_tokens=0",
                                                         "syn/test ckpt.pt step 2 float32 eval_tokens=0 window=1024"]
    assert eval_results.final_result(rows, 2, "syn/test")[0]["loss"] == own["loss"]
    code, err = cli(eval_script.main, [out, "--dataset=syn", f"--data_dir={data}", "--block_size=4096"], capsys)
    assert code == 2 and "--block_size=4096 is longer than the model's block_size 3072" in err
    # sampling sees past 1,024 tokens: greedy continuations of a 1,500-token prompt (GPT-2 tokens
    # 61 and 93, inside the tiny vocabulary) are the argmax of the model's logits on all of it
    prompt = "^~" * 750
    capsys.readouterr()
    sample.main([out, f"--prompt={prompt}", "--num_samples=1", "--max_new_tokens=2", "--temperature=0",
                 "--device=cpu"])
    from gpt_interventions.tokenizer import get_tokenizer
    enc = get_tokenizer()
    ids = enc.encode(prompt)
    assert 1024 < len(ids) < 3072 and max(ids) < 256
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(2):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert capsys.readouterr().out.split("\n")[0] == enc.decode(idx[0].tolist())


@pytest.mark.skipif(not os.path.isdir(RUNS), reason=f"{RUNS} is absent")
def test_an_expert_run_trains_and_evaluates_from_its_directory(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    out = str(tmp_path / "moe")
    train.main([os.path.join(RUNS, "1xrtx3090-moe-no-balancing"), *TINY, "--block_size=32", "--vocab_size=256",
                f"--data_dir={data}", f"--out_dir={out}", "--total_batch_size=192", "--max_iters=3",
                "--eval_tokens=1024"])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    m, t = config["model"], config["train"]
    assert (m["n_expert"], m["expert_top_k"], m["moe_draws"], t["moe_aux_loss"], t["batch_size"],
            config["derived"]["accum"]) == (6, 2, "story", 0.0, 3, 2)
    assert (t["grad_clip"], t["weight_decay"], t["lr_schedule"], m["dropout"]) == (3.5, 0.01, "story", 0.0)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 3 and all(len(r["expert_frac"]) == 2 and len(r["expert_frac"][0]) == 6 for r in rows)
    model, _ = load_model(out)
    got = scored(out, data, capsys)
    loss, tokens = reference_loss(model, read_shard(os.path.join(data, "syn", "test_000000.bin")), 32)
    assert got["tokens"] == tokens and got["loss"] == pytest.approx(loss, rel=1e-6)


def test_auto_batch_size_searches_the_long_context_runs_micro_batches(tmp_path, capsys, monkeypatch):
    """--auto_batch_size on his 3,072-token run: the trial steps are real steps at block 3,072 (a GPU's
    peak, injected here as on a 24 GB card where only one sequence fits), over the divisors of the 96
    sequences a step; a micro-batch of 1 is what his RTX 3090 ran."""
    tried = []

    def rtx3090(mc, tc, d, batch_size):
        tried.append((batch_size, mc.block_size))
        if batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return 0.5
    monkeypatch.setattr(microbatch, "trial_step", rtx3090)
    long = os.path.join(ROOT, "config", "story", "1xrtx3090-context-extension.toml")
    got = dry_run([long, "--auto_batch_size"], 1, capsys, monkeypatch)
    assert got["derived"]["micro_batch"] == "auto" and got["derived"]["tokens_per_step"] == 294_912
    mc, tc, _ = train.resolve_config([long, "--auto_batch_size", "--dry_run"], train.USAGE)
    assert microbatch.rows_per_rank(mc, tc, 1) == 96 and microbatch.rows_per_rank(mc, tc, 8) == 12
    from gpt_interventions.device import Dist
    assert microbatch.largest_micro_batch(mc, tc, Dist(0, 0, 1, "cpu"), 96) == 1
    assert tried == [(8, 3072), (3, 3072), (1, 3072), (2, 3072)]  # binary search over 1, 2, 3, 4, 6, 8, ..., 96
