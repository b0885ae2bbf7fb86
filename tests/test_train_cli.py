"""train.py's command line: typed flags, presets, precedence, and one-line errors for bad input."""

import dataclasses
import os
import subprocess
import sys

import pytest

import train
from gpt_interventions.cli import parse_config
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.training import TrainConfig
from helpers import ROOT, make_shards, snapshot, tiny_flags
from model import GPTConfig

CLASSES = [GPTConfig, TrainConfig]


def parse(*argv):
    (mc, tc), _, _ = parse_config(list(argv), CLASSES, "train.py", train.USAGE)
    return mc, tc


def test_flags_are_typed_from_the_dataclasses():
    mc, tc = parse("--qkv_bias=True", "--dropout=0", "--grad_clip=3.5", "--max_iters=1e3", "--compile", "--tf32=false")
    assert mc.qkv_bias is True and mc.dropout == 0.0 and isinstance(mc.dropout, float)
    assert tc.grad_clip == 3.5 and tc.max_iters == 1000 and tc.compile is True and tc.tf32 is False


def test_defaults_are_the_story_baseline_preset():
    assert parse() == parse(os.path.join(ROOT, "config/baseline.toml"))


def test_best_preset_is_the_storys_stacked_interventions_1():
    mc, tc = parse(os.path.join(ROOT, "config/best.toml"))
    assert (tc.grad_clip, mc.qkv_bias, tc.weight_decay, mc.dropout) == (3.5, False, 0.01, 0.0)  # no QKV bias
    assert (tc.learning_rate, tc.lr_schedule, tc.warmup_frac, tc.min_lr) == (0.0014, "story", 0.05, 0.00014)
    base_mc, base_tc = parse()
    diff = {k for k, v in {**dataclasses.asdict(mc), **dataclasses.asdict(tc)}.items()
            if v != {**dataclasses.asdict(base_mc), **dataclasses.asdict(base_tc)}[k]}
    assert diff == {"grad_clip", "weight_decay", "dropout", "learning_rate", "lr_schedule", "warmup_frac", "min_lr"}
    assert parse(os.path.join(ROOT, "config/story/stacked-interventions-1.toml")) == (mc, tc)


def test_precedence_defaults_then_presets_then_flags():
    tiny, best = os.path.join(ROOT, "config/tiny.toml"), os.path.join(ROOT, "config/best.toml")
    mc, tc = parse(tiny, best, "--learning_rate=0.01")
    assert mc.n_layer == 2 and tc.device == "cpu"  # from tiny
    assert tc.grad_clip == 3.5  # from best, stacked on tiny
    assert tc.learning_rate == 0.01  # the flag wins over both
    assert tc.beta1 == 0.9  # untouched default


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            assert f"--{f.name}={f.default}" in out


BAD = [
    (["--grad_clp=3"], "unknown flag --grad_clp (did you mean --grad_clip?)"),
    (["--grad_clip=abc"], "--grad_clip expects float, got 'abc'"),
    (["--qkv_bias=maybe"], "--qkv_bias expects True or False"),
    (["--n_layer=2.5"], "--n_layer expects int"),
    (["--lr_schedule=linear"], "lr_schedule must be one of constant, cosine, wsd, story"),
    (["--n_head=5"], "n_embd 768 is not divisible by n_head 5"),
    (["--max_iters"], "--max_iters needs a value"),
    (["missing.toml"], "preset missing.toml not found"),
    (["stray"], "unexpected argument 'stray'"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_main(train.main, argv + [f"--out_dir={tmp_path / 'never'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "never")  # nothing written


def test_bad_preset_key_and_type(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("grad_clip = 'high'\n")
    with pytest.raises(UsageError, match="grad_clip expects float"):
        parse(str(bad))
    bad.write_text("learning_rat = 0.1\n")
    with pytest.raises(UsageError, match="did you mean --learning_rate"):
        parse(str(bad))


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path / "data", train=(2_000,))


def fails(flags, message):
    with pytest.raises(UsageError) as e:
        train.main(flags)
    assert message in str(e.value)


def test_batch_not_divisible_into_micro_batches(data_dir, tmp_path):
    fails(tiny_flags(data_dir, str(tmp_path / "o"), total_batch_size=300),
          "total_batch_size 300 is not divisible into micro-batches of batch_size*block_size*ranks = 128")


def test_step_larger_than_the_data(data_dir, tmp_path):
    fails(tiny_flags(data_dir, str(tmp_path / "o"), total_batch_size=4096),
          "one optimizer step needs 4097 tokens but the train shards hold 2000")


def test_block_larger_than_the_validation_split(tmp_path):
    data_dir = make_shards(tmp_path / "data", val=20)
    fails(tiny_flags(data_dir, str(tmp_path / "o")), "shorter than one block of 33 tokens")


def test_missing_dataset_names_the_command(tmp_path):
    fails(tiny_flags(str(tmp_path / "nodata"), str(tmp_path / "o")),
          "prepare them with: python prepare_data.py --dataset=syn")


def test_token_ids_outside_the_vocabulary(data_dir, tmp_path):
    fails(tiny_flags(data_dir, str(tmp_path / "o"), vocab_size=100), "outside the model's vocab_size 100")


def test_a_directory_that_is_not_a_run_is_refused(data_dir, tmp_path):
    export = str(tmp_path / "hf")
    os.makedirs(export)
    with open(os.path.join(export, "config.json"), "w") as f:
        f.write('{"model_type": "gpt2"}')  # a Hugging Face export, say
    fails(tiny_flags(data_dir, export), "config.json was not written by train.py (a model export?)")
    stray = str(tmp_path / "stray")
    os.makedirs(stray)
    open(os.path.join(stray, "metrics.jsonl"), "w").close()
    fails(tiny_flags(data_dir, stray), "holds metrics.jsonl but no config.json or checkpoint")


def test_existing_run_is_never_overwritten(data_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    train.main(tiny_flags(data_dir, out, max_iters=2, total_batch_size=128))
    before = snapshot(out)
    fails(tiny_flags(data_dir, out, max_iters=2, total_batch_size=128, grad_clip=1.0),
          "holds a run with another config (grad_clip: 0.0 -> 1.0); continue it with its own config")
    assert snapshot(out) == before
    capsys.readouterr()
    train.main(tiny_flags(data_dir, out, max_iters=2, total_batch_size=128))  # the same command: it is done
    assert "is finished (2 of 2 steps): nothing to do" in capsys.readouterr().out and snapshot(out) == before


def test_resume_refuses_a_changed_config(data_dir, tmp_path):
    out = str(tmp_path / "o")
    train.main(tiny_flags(data_dir, out, max_iters=2, total_batch_size=128))
    fails(tiny_flags(data_dir, out, max_iters=2, total_batch_size=128, n_embd=64, resume=True),
          "cannot resume")
    fails(tiny_flags(data_dir, out, max_iters=2, total_batch_size=128, n_embd=64, resume=True),
          "n_embd: 32 -> 64")


def test_resume_without_a_checkpoint(tmp_path):
    fails(["--resume", f"--out_dir={tmp_path}"], "checkpoint")


def test_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--n_head=7", f"--out_dir={tmp_path}/x"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: n_embd 768 is not divisible by n_head 7\n"
