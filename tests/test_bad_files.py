"""Bad files: a damaged checkpoint, a bad shard, token ids outside the vocabulary or a split
shorter than one block are one line naming the file, exit status 2, and nothing written
(docs/clusters.md, What a run can count on)."""

import os
import shutil

import numpy as np
import pytest

import eval as eval_py
import sample
import train
from gpt_interventions import shards
from gpt_interventions.shards import write_shard
from helpers import cli, make_shards, snapshot, synthetic_tokens, tiny_flags

# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_checkpoint_is_refused_by_every_script(damage, data_dir, finished_run, tmp_path, capsys):
    out = shutil.copytree(finished_run, tmp_path / "run")
    path = os.path.join(out, "ckpt.pt")
    raw = open(path, "rb").read()
    mid = len(raw) // 2
    raw = raw[:mid] if damage == "truncated" else raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 64]) + raw[mid + 64:]
    with open(path, "wb") as f:
        f.write(raw)
    before = snapshot(out)
    for main, argv in [(train.main, tiny_flags(data_dir, out, resume=True, max_iters=2, total_batch_size=128)),
                       (eval_py.main, [path, f"--data_dir={data_dir}", "--dataset=syn", "--ledger="]),
                       (sample.main, [out, "--max_new_tokens=2"])]:
        code, err = cli(main, argv, capsys)
        assert code == 2 and err.startswith(f"error: checkpoint {path} is unreadable") and err.count("\n") == 1, err
    assert snapshot(out) == before


def damage_shard(path, how):
    n = shards.read_header(path)
    if how == "magic":
        with open(path, "r+b") as f:
            f.write(np.int32(12345).tobytes())
    elif how == "size":
        os.truncate(path, os.path.getsize(path) - 10)
    elif how == "vocab":  # as if made by another tokenizer: ids up to 511 for a 256-token model
        write_shard(path, synthetic_tokens(n, vocab=512))
    elif how == "short":
        write_shard(path, synthetic_tokens(20))


@pytest.mark.parametrize("split,how,message", [
    ("train", "magic", "has magic 12345, expected 20240520"),
    ("train", "size", "header says 40000 tokens: truncated or corrupted"),
    ("train", "vocab", "outside the model's vocab_size 256"),
    ("train", "short", "one optimizer step needs 257 tokens but the train shards hold 20"),
    ("val", "vocab", "outside the model's vocab_size 256"),
    ("val", "short", "(20 tokens) is shorter than one block of 33 tokens"),
])
def test_a_bad_shard_is_one_line_naming_the_file(split, how, message, finished_run, tmp_path, capsys):
    data_dir = make_shards(tmp_path / "data")
    shard = os.path.join(data_dir, "syn", f"{split}_000000.bin")
    damage_shard(shard, how)
    before = snapshot(data_dir)
    runs = [(train.main, tiny_flags(data_dir, tmp_path / "new"))]
    if split == "val":
        runs.append((eval_py.main, [finished_run, f"--data_dir={data_dir}", "--dataset=syn", "--split=val", "--ledger="]))
    for main, argv in runs:
        code, err = cli(main, argv, capsys)
        assert code == 2 and message in err and shard in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "new")  # a refused run writes nothing
    assert snapshot(data_dir) == before


def test_bad_tokens_refuse_a_resume_before_anything_is_written(finished_run, tmp_path, capsys):
    data_dir = make_shards(tmp_path / "data")
    damage_shard(os.path.join(data_dir, "syn", "train_000000.bin"), "vocab")  # same size, other ids
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = cli(train.main, tiny_flags(data_dir, out, resume=True, max_iters=2, total_batch_size=128), capsys)
    assert code == 2 and "outside the model's vocab_size 256" in err
    assert snapshot(out) == before  # not even log.txt or metrics.jsonl
