"""sample.py: seeded continuations of a prompt from any model gpt_interventions/formats.py loads."""

import os
import subprocess
import sys

import pytest

import sample
from gpt_interventions.errors import run_main
from helpers import ROOT, make_shards, tiny_hf, tiny_run

PROMPT = "Every effort moves you"
SEP = "-" * 40 + "\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), train=(4_000,))


@pytest.fixture(scope="module")
def gpt2_vocab_run(data_dir, tmp_path_factory):
    """A tiny run with GPT-2's vocabulary, so that the prompt's tokens fit."""
    return tiny_run(data_dir, tmp_path_factory.mktemp("runs") / "wide", vocab_size=50257)


def samples(capsys, model, *flags):
    sample.main([model, "--max_new_tokens=12", "--device=cpu", *flags])
    return capsys.readouterr().out


def test_same_seed_same_text_other_seed_other_text(gpt2_vocab_run, capsys):
    a = samples(capsys, gpt2_vocab_run, "--num_samples=2")
    b = samples(capsys, gpt2_vocab_run, "--num_samples=2")
    c = samples(capsys, gpt2_vocab_run, "--num_samples=2", "--seed=43")
    assert a == b and a != c
    texts = a.split(SEP)
    assert len(texts) == 3 and texts[-1] == ""  # two samples, each ended by the separator
    assert all(t.startswith(PROMPT) and len(t) > len(PROMPT) + 1 for t in texts[:2])
    assert texts[0] != texts[1]  # one seed, but each sample draws its own tokens


def test_the_script_prints_what_main_prints(gpt2_vocab_run, capsys):
    expected = samples(capsys, gpt2_vocab_run, "--prompt=Hello there")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "sample.py", gpt2_vocab_run, "--max_new_tokens=12", "--device=cpu",
                           "--prompt=Hello there"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected and proc.stdout.count(SEP) == 3


def test_greedy_sampling_ignores_the_seed(tmp_path, capsys):
    tiny_hf(tmp_path / "hf", vocab=50257)  # a Hugging Face directory samples the same way
    a = samples(capsys, str(tmp_path / "hf"), "--temperature=0", "--num_samples=1")
    b = samples(capsys, str(tmp_path / "hf"), "--temperature=0", "--num_samples=1", "--seed=7")
    assert a == b and a.startswith(PROMPT)


@pytest.mark.parametrize("flags,message", [
    (["--num_samples=0"], "--num_samples must be positive"),
    (["--temperature=-1"], "--temperature"),
    (["--top_k=many"], "--top_k expects int"),
])
def test_bad_flags_exit_2_with_one_line(gpt2_vocab_run, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(sample.main, [gpt2_vocab_run, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err


def test_model_without_gpt2_vocab_is_one_line(data_dir, tmp_path, capsys):
    ckpt = tiny_run(data_dir, tmp_path / "small")  # vocab_size 256
    with pytest.raises(SystemExit) as e:
        run_main(sample.main, [ckpt, "--device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "outside the model's vocab_size 256" in err
