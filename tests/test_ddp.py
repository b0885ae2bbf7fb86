"""train.py under torchrun (2 processes, gloo on the CPU) matches the single-process run."""

import os

import pytest
import torch

import train
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.shards import write_shard
from helpers import curve, make_shards, synthetic_tokens, tiny_flags, torchrun


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(tmp_path):
    data_dir = make_shards(tmp_path / "data")
    # 256 tokens per step: 1 process x 2 micro-batches of 4 x 32, or 2 ranks x 1 micro-batch
    flags = dict(max_iters=6, eval_interval=3, batch_size=4)
    train.main(tiny_flags(data_dir, str(tmp_path / "one"), **flags))
    proc = torchrun("train.py", tiny_flags(data_dir, str(tmp_path / "two"), **flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa = load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))["model"]
    wb = load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert proc.stdout.count("done: 6 steps") == 1  # progress from rank 0 only


@pytest.mark.slow
def test_a_bad_token_in_one_ranks_rows_stops_every_rank_with_one_line(tmp_path):
    # Token id 300 (vocab 256) sits in rank 1's half of step 3's chunk only. Every rank checks
    # the whole step, so both stop before step 3 with the same line: no rank is left waiting in
    # a collective, and no rank dies of a closed connection with a traceback.
    data_dir = make_shards(tmp_path / "data")
    tokens = synthetic_tokens(40_000, seed=0)
    tokens[2 * 256 + 128 + 5] = 300  # step 3 trains on chunk 2; rank 1 reads its second half
    write_shard(os.path.join(data_dir, "syn", "train_000000.bin"), tokens)
    proc = torchrun("train.py", tiny_flags(data_dir, str(tmp_path / "run"), eval_interval=0))
    assert proc.returncode != 0
    line = "error: shard " + os.path.join(data_dir, "syn", "train_000000.bin") + " holds token id 300"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    # (torchrun itself prints a ChildFailedError report whenever a worker exits non-zero)
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert "Connection closed" not in proc.stderr
    assert [r["step"] for r in curve(tmp_path / "run")] == [1, 2]
