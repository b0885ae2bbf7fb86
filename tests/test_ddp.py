"""train.py under torchrun (2 processes, gloo on the CPU) matches the single-process run."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.shards import write_shard
from helpers import ROOT, assert_same_run, curve, make_shards, synthetic_tokens, tiny_flags, torchrun


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(tmp_path):
    data_dir = make_shards(tmp_path / "data")
    # 256 tokens per step: 1 process x 2 micro-batches of 4 x 32, or 2 ranks x 1 micro-batch; with
    # dropout, whose masks are keyed by each sequence's index in the step, not by rank
    flags = dict(max_iters=6, eval_interval=3, batch_size=4, dropout=0.1)
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


def close_to(one, two):
    """The same tokens and schedule on another split of the step: sums in another order."""
    a, b = curve(one), curve(two)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa, wb = (load_checkpoint(os.path.join(str(d), "ckpt.pt"))["model"] for d in (one, two))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torchrun_max_restarts_finishes_a_run_whose_rank_died_bitwise(tmp_path):
    # rank 1 dies before step 6 (the last checkpoint: step 4); torchrun restarts both ranks with the
    # same command line, which continues the run in place: the job ends by itself, exactly as if
    # nothing had happened. (Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted ranks read
    # the previous round's addresses from torchrun's shared store and cannot connect: pytorch#135712.)
    data_dir = make_shards(tmp_path / "data")
    flags = dict(max_iters=12, eval_interval=6, batch_size=4, dropout=0.1, lr_schedule="cosine", warmup_iters=3,
                 grad_clip=1.0, checkpoint_interval=4)
    ref = torchrun("train.py", tiny_flags(data_dir, str(tmp_path / "ref"), **flags))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = str(tmp_path / "run")
    proc = torchrun(os.path.join(ROOT, "tests", "fault_train.py"), tiny_flags(data_dir, out, **flags),
                    launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    FAULT="die_once:6", FAULT_DIR=str(tmp_path), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "died") and "resuming" in proc.stdout and "done: 12 steps" in proc.stdout
    assert_same_run(tmp_path / "ref", out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_process(tmp_path):
    # two torchrun "nodes" of one rank each, meeting at a c10d rendezvous, as two machines would
    data_dir = make_shards(tmp_path / "data")
    flags = dict(max_iters=6, eval_interval=3, batch_size=4)
    train.main(tiny_flags(data_dir, str(tmp_path / "one"), **flags))
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=two-nodes", "train.py", *tiny_flags(data_dir, str(tmp_path / "two"), **flags)],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "2 ranks x 1 micro-batches" in results[0][0] + results[1][0]
    close_to(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_nodes_that_see_different_run_directories_refuse_to_train_together(tmp_path):
    # each "node" has its own working directory, as machines with their own disks: after a first
    # run, one node's ranks see its checkpoint and the other's none; a restart must not mix them
    data_dir = make_shards(tmp_path / "data")
    flags = tiny_flags(data_dir, "run", max_iters=2, batch_size=4)

    def launch():
        port = free_port()
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=own-disks",
                                   os.path.join(ROOT, "train.py"), *flags], cwd=tmp_path / node,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for node in ("a", "b")]
        return [(node.communicate(timeout=300), node.returncode) for node in nodes]
    for node in ("a", "b"):
        (tmp_path / node).mkdir()
    assert [rc for _, rc in launch()] == [0, 0]
    assert [os.path.isdir(tmp_path / n / "run") for n in ("a", "b")].count(True) == 1  # rank 0 wrote one
    second = launch()
    assert all(rc != 0 for _, rc in second)
    for (out, err), _ in second:
        assert "the ranks found different checkpoints in run (steps 0 to 2): a run directory must be on " \
               "storage that every node shares" in err
