"""Bad flags: random flag names and values for train.py, eval.py, sample.py and prepare_data.py
either run or exit 2 with a one-line message, never a traceback (docs/clusters.md, What a run can count on).

FUZZ_EXAMPLES=N runs more examples of each.
"""

import contextlib
import io
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eval as eval_py
import prepare_data
import sample
import train
from gpt_interventions.cli import config_fields
from gpt_interventions.errors import run_main
from gpt_interventions.training import TrainConfig
from helpers import tiny_flags
from model import GPTConfig

# --- bad flags: random names and values never give a traceback -----------------------------------

# what a shell can pass: no NUL, no lone surrogates
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
NUMBERS = st.sampled_from(["0", "1", "-1", "2.5", "1e1", "-0", "1_0", " 3", "0x10", "nan", "inf", "-inf",
                           "True", "off", ""])
HUGE = st.sampled_from(["1e400", "9" * 30, "-9" * 20, "1e30", "18446744073709551616"])
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 30)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def flags(classes, leave_out=(), small=(), huge=True):
    """Random flags: the config's names with valid, junk or huge values, made-up names, stray words.

    `small` names get only small numbers (they size the work); `leave_out` names are never drawn.
    """
    table = {n: v for n, v in config_fields(classes).items() if n not in leave_out}
    junk = st.one_of(NUMBERS, st.integers(-3, 40).map(str), st.floats(-3, 3, allow_subnormal=False).map(str), TEXT,
                     *([HUGE, st.integers().map(str)] if huge else []))

    def value(name):
        _, f, typ = table[name]
        if f.metadata.get("choices"):
            valid = st.sampled_from(f.metadata["choices"])
        elif typ is bool:
            valid = st.sampled_from(["True", "False", "1", "off"])
        elif typ is int:
            valid = st.integers(0, 8).map(str)
        elif typ is float:
            valid = st.floats(0, 1, allow_subnormal=False).map(str)
        else:
            valid = TEXT
        return st.one_of(valid, valid, NUMBERS, st.integers(-3, 40).map(str)) if name in small else st.one_of(valid, valid, junk)
    made_up = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
    names = st.sampled_from(sorted(table))
    flag = st.one_of(
        *[names.flatmap(lambda n: value(n).map(lambda v: f"--{n}={v}"))] * 4,  # the common case
        names.map(lambda n: f"--{n}"),  # no value
        made_up.map(lambda n: f"--{n}=1"),
        TEXT.map(lambda t: "--" + t),
        TEXT.filter(lambda t: not t.startswith("-")),  # a stray positional
    )
    return st.lists(flag, max_size=4)


def check_cli(main, argv, allowed=(0, 2)):
    """Run; it either succeeds or exits with a one-line `error:` message, never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, argv)
            code = 0
        except SystemExit as e:
            code = e.code
    msg = err.getvalue()
    assert code in allowed, (argv, code, msg)
    if code not in (0, None):
        assert msg.startswith("error: ") and msg.count("\n") == 1, (argv, msg)
    return code


@given(argv=flags([GPTConfig, TrainConfig]))
@FUZZ
def test_fuzz_train_flags_validate_before_anything_runs(argv, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")  # no dataset: whatever the flags, nothing can train
    check_cli(train.main, argv + [f"--data_dir={empty}", f"--out_dir={empty}/run", "--compile=False"])
    assert os.listdir(empty) == []


TRAIN_SIZES = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "total_batch_size",
               "gradient_accumulation_steps", "max_iters", "max_tokens", "warmup_iters"}


@pytest.mark.slow
@given(argv=flags([GPTConfig, TrainConfig], leave_out={"data_dir", "out_dir", "dataset", "compile"},
                  small=TRAIN_SIZES))
@FUZZ
def test_fuzz_train_flags_on_real_data(argv, data_dir):
    out = os.path.join(os.path.dirname(data_dir), "fuzz", uuid.uuid4().hex)
    base = tiny_flags(data_dir, out, max_iters=2, total_batch_size=128, eval_tokens=64)
    # exit 1 is a run that diverged (a huge learning rate): one line, the last checkpoint kept
    check_cli(train.main, base + argv + ["--compile=False", f"--out_dir={out}"], allowed=(0, 1, 2))


@given(argv=flags([eval_py.EvalConfig], leave_out={"ledger", "export_hf", "export_book", "data_dir",
                                                             "push_to_hub"}))
@FUZZ
def test_fuzz_eval_flags(argv, data_dir, finished_run):
    check_cli(eval_py.main, [os.path.join(finished_run, "ckpt.pt"), f"--data_dir={data_dir}", "--dataset=syn",
                             *argv, "--ledger=", "--export_hf=", "--export_book="])


@pytest.fixture(scope="module")
def gpt2_vocab_run(data_dir, tmp_path_factory):
    """A tiny run with GPT-2's vocabulary, so that prompts fit and sampling runs."""
    out = str(tmp_path_factory.mktemp("wide") / "run")
    train.main(tiny_flags(data_dir, out, max_iters=1, total_batch_size=128, vocab_size=50257))
    return out


@given(argv=flags([sample.SampleConfig], small={"num_samples", "max_new_tokens"}))
@FUZZ
def test_fuzz_sample_flags(argv, gpt2_vocab_run):
    check_cli(sample.main, [gpt2_vocab_run, *argv])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(f'{{"id": "{i}", "text": "document {i} says {"hello " * (i % 7)}"}}\n' for i in range(40)))
    return str(path)


@given(argv=flags([prepare_data.PrepConfig], leave_out={"input", "data_dir", "num_proc"}))
@settings(FUZZ, max_examples=FUZZ.max_examples * 2 // 3)
def test_fuzz_prepare_data_flags(argv, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    check_cli(prepare_data.main, ["--dataset=fuzz", *argv, f"--input={corpus}", f"--data_dir={root}", "--num_proc=1"])
