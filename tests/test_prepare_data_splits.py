"""prepare_data.py: what each split depends on (and what it must not), caches, meta.json's counts,
impossible sizes, and FineWeb's offline route."""

import json
import os

import numpy as np
import pytest

import prepare_data
from gpt_interventions import shards, tokenizer
from gpt_interventions.errors import UsageError
from test_prepare_data import fails, fake_hub, prepare, shard_bytes, split_docs, words_corpus  # noqa: F401


def three_files(tmp_path, n_docs=150):
    """Three .jsonl files of n_docs documents (ids doc-0.., doc-1000.., doc-2000..); returns
    (glob, {id: text}, [(file's ids)])."""
    texts, per_file = {}, []
    for i in range(3):
        docs = words_corpus(tmp_path / f"part{i}.jsonl", n_docs, seed=i, start=1000 * i)
        texts.update(docs)
        per_file.append(list(docs))
    return str(tmp_path / "part*.jsonl"), texts, per_file


def first_by_key(ids, texts, need):
    """A reference test split: the ids in split-key order until `need` tokens (EOT included)."""
    enc, out = tokenizer.get_tokenizer(), []
    for i in sorted(ids, key=lambda i: prepare_data.split_key(i, texts[i])):
        if need <= 0:
            break
        out.append(i)
        need -= len(enc.encode_ordinary(texts[i])) + 1
    return out


def test_test_split_depends_on_neither_val_tokens_nor_max_tokens(tmp_path):
    glob_, texts, per_file = three_files(tmp_path)
    # a small val budget is met in the first file; a large one needs all three, and (before the fix)
    # the test split was then drawn from all three files' held-out documents
    small = prepare(tmp_path / "a", "--dataset=w", f"--input={glob_}", "--test_tokens=500", "--val_tokens=100")
    large = prepare(tmp_path / "b", "--dataset=w", f"--input={glob_}", "--test_tokens=500", "--val_tokens=1500",
                    "--max_tokens=2000")
    a, b = shard_bytes(small, "w"), shard_bytes(large, "w")
    assert a["test_000000.bin"] == b["test_000000.bin"]
    meta_a, meta_b = (json.load(open(d / "w" / "meta.json")) for d in (small, large))
    assert meta_a["pool_files"] == {"test": 1, "val": 1} and meta_b["pool_files"] == {"test": 1, "val": 3}
    # the test split is the held-out documents of the first file (the shortest prefix holding
    # test_tokens of them) in split-key order, the last one cut at the budget
    held = [i for i in per_file[0] if prepare_data.split_key(i, texts[i]) < int(0.1 * 2**64)]
    expect = [texts[i] for i in first_by_key(held, texts, 500)]
    got = split_docs(small, "w", "test")
    assert got[:-1] == expect[:-1] and expect[-1].startswith(got[-1])
    # val never repeats a test document, and the large val reaches into the later files
    for out in (small, large):
        assert not set(split_docs(out, "w", "val")) & set(texts[i] for i in first_by_key(held, texts, 500))
    assert {texts[i] for i in per_file[2]} & set(split_docs(large, "w", "val"))


@pytest.mark.parametrize("first_run", ["fails", "interrupted"])
def test_caches_left_by_a_run_with_another_holdout_frac_change_nothing(tmp_path, monkeypatch, first_run):
    """The review's reproduction: a run that fails (too few held-out tokens) or is interrupted
    leaves its per-file caches; a rerun with another --holdout_frac gives a fresh run's bytes."""
    glob_, _, _ = three_files(tmp_path, n_docs=100)
    flags = ["--dataset=w", f"--input={glob_}", "--max_tokens=6000"]
    if first_run == "fails":
        with pytest.raises(UsageError, match="fewer than val_tokens"):
            prepare(tmp_path, *flags, "--holdout_frac=0.02", "--val_tokens=3000", "--test_tokens=3000")
    else:
        encode = prepare_data.encode_batch

        def stop_in_third_file(docs):
            if docs[0][0] == "doc-2000":
                raise KeyboardInterrupt
            return encode(docs)
        monkeypatch.setattr(prepare_data, "encode_batch", stop_in_third_file)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path, *flags, "--holdout_frac=0.02")
        monkeypatch.setattr(prepare_data, "encode_batch", encode)
    assert len(os.listdir(tmp_path / "data" / "w" / ".cache")) >= 6  # two files' caches are left
    # with the first run's counts, the first file alone looked enough for max_tokens
    again = ["--holdout_frac=0.5", "--val_tokens=1000", "--test_tokens=1000"]
    rerun = prepare(tmp_path, *flags, *again)
    fresh = prepare(tmp_path / "fresh", *flags, *again)
    assert shard_bytes(rerun, "w") == shard_bytes(fresh, "w")
    assert open(rerun / "w" / "meta.json").read() == open(fresh / "w" / "meta.json").read()
    assert json.load(open(fresh / "w" / "meta.json"))["splits"]["train"]["tokens"] == 6000


def test_a_prepared_dataset_is_not_reused_when_its_input_files_changed(tmp_path, capsys):
    words_corpus(tmp_path / "c.jsonl", 100)
    out = prepare(tmp_path, "--dataset=w", f"--input={tmp_path / 'c.jsonl'}")
    before = shard_bytes(out, "w")
    words_corpus(tmp_path / "c.jsonl", 100, seed=1)  # same name and arguments, other documents
    fails(["--dataset=w", f"--input={tmp_path / 'c.jsonl'}", f"--data_dir={out}"],
          "was prepared from other input files", capsys)
    assert shard_bytes(out, "w") == before
    prepare(tmp_path, "--dataset=w", f"--input={tmp_path / 'c.jsonl'}", "--overwrite")
    assert shard_bytes(out, "w") == shard_bytes(prepare(tmp_path / "fresh", "--dataset=w",
                                                        f"--input={tmp_path / 'c.jsonl'}"), "w")


def eot_counts(data_dir, dataset):
    meta = json.load(open(os.path.join(data_dir, dataset, "meta.json")))
    for split, info in meta["splits"].items():
        tokens = np.concatenate([shards.read_shard(p) for p, _ in shards.find_shards(str(data_dir), dataset, split)])
        yield split, info, int((tokens == tokenizer.EOT).sum()), tokens.size


def test_meta_counts_are_the_shards_counts(tmp_path):
    glob_, _, _ = three_files(tmp_path, n_docs=100)
    cut = prepare(tmp_path / "cut", "--dataset=w", f"--input={glob_}", "--max_tokens=100", "--shard_tokens=60",
                  "--val_tokens=300", "--test_tokens=400")
    whole = prepare(tmp_path / "whole", "--dataset=w", f"--input={glob_}")
    for out in (cut, whole):
        for split, info, eots, size in eot_counts(out, "w"):
            assert (info["documents"], info["tokens"]) == (eots, size), (out, split)
    assert json.load(open(cut / "w" / "meta.json"))["splits"]["train"]["tokens"] == 100


def test_impossible_sizes_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    words_corpus(tmp_path / "c.jsonl", 20)
    monkeypatch.setattr(prepare_data, "encode_batch", lambda docs: pytest.fail("tokenized before refusing"))
    base = ["--dataset=w", f"--input={tmp_path / 'c.jsonl'}", f"--data_dir={tmp_path / 'data'}"]
    for flag, message in [("--shard_tokens=2147483648", "--shard_tokens must be at most 2,147,483,647"),
                          ("--shard_tokens=1e12", "--shard_tokens must be at most 2,147,483,647"),
                          ("--shard_tokens=0", "--shard_tokens must be positive"),
                          ("--shard_tokens=-5", "--shard_tokens must be positive"),
                          ("--shard_tokens=2.5", "--shard_tokens expects int"),
                          ("--max_tokens=-1", "--max_tokens must be 0 or positive"),
                          ("--max_tokens=1.5e0", "--max_tokens expects int"),
                          ("--num_proc=-2", "--num_proc must be 0 or positive"),
                          ("--holdout_frac=1", "--holdout_frac must be in [0, 1)"),
                          ("--holdout_frac=nan", "--holdout_frac must be in [0, 1)"),
                          ("--holdout_frac=-0.1", "--holdout_frac must be in [0, 1)"),
                          ("--holdout_frac=1e-30", "--holdout_frac=1e-30 holds out no document")]:
        fails([*base, flag], message, capsys)
    fails([*base, "--val_tokens=-3", "--test_tokens=10"], "--val_tokens must be 0 or positive", capsys)
    fails(["--dataset=story", f"--data_dir={tmp_path / 'data'}", "--shard_tokens=2147483648"],
          "--shard_tokens must be at most 2,147,483,647", capsys)
    assert not os.path.exists(tmp_path / "data")


# --- FineWeb offline: the hub's parquet files through --input ----------------------------------


def test_fineweb_parquet_through_input_gives_the_hub_routes_splits(tmp_path, fake_hub, capsys):
    budgets = ["--val_tokens=2000", "--test_tokens=4000"]
    hub = prepare(tmp_path / "hub", "--dataset=fineweb", *budgets)
    local = os.path.dirname(fake_hub.files["sample/10BT/000_00000.parquet"])
    copy = f"--input={local}/*.parquet"
    offline = prepare(tmp_path / "offline", "--dataset=fineweb", copy, *budgets)
    assert shard_bytes(offline, "fineweb") == shard_bytes(hub, "fineweb")
    # under another name the hub's settings are three flags
    named = prepare(tmp_path / "named", "--dataset=fw", copy, "--holdout_frac=0.05", *budgets)
    assert shard_bytes(named, "fw") == shard_bytes(hub, "fineweb")
    # a copy of the first file only (what a capped hub run downloads) keeps the test split
    first = prepare(tmp_path / "first", "--dataset=fineweb", f"--input={local}/000_*.parquet", *budgets)
    assert shard_bytes(first, "fineweb")["test_000000.bin"] == shard_bytes(hub, "fineweb")["test_000000.bin"]
    # without budgets, the copy takes the hub's (31,457,280 held-out tokens: far beyond these files)
    fails(["--dataset=fineweb", copy, f"--data_dir={tmp_path / 'x'}"],
          "fewer than val_tokens + test_tokens = 31,457,280", capsys)
