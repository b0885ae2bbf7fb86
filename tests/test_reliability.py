"""Fault injection: a run survives crashes, preemption, a changed world, bad files and flags,
non-finite numbers, long runs and a full disk, with nothing lost (docs/clusters.md, What a run can count on).

Faults in a real process come from tests/fault_train.py (train.py plus one injected fault).
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from gpt_interventions import checkpoint, loader, rundir
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.errors import UsageError
from gpt_interventions.formats import load_model
from gpt_interventions.shards import write_shard
from helpers import (
    stop_after,
    EXACT,
    ROOT,
    assert_same_run,
    ckpt_of,
    cli,
    curve,
    make_shards,
    read_metrics,
    snapshot,
    synthetic_tokens,
    tiny_flags,
)
from model import GPT

FAULT_TRAIN = os.path.join(ROOT, "tests", "fault_train.py")
# across world sizes only to float tolerance; dropout on: its masks are keyed per sequence, not rank
WORLD = dict(max_iters=12, lr_schedule="cosine", warmup_iters=3, grad_clip=1.0, batch_size=4, dropout=0.1)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run that every interrupted one must match bit for bit."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    train.main(tiny_flags(data_dir, out, **EXACT))
    return out


@pytest.fixture(scope="module")
def world_reference(data_dir, tmp_path_factory):
    """One process, 2 micro-batches of 4 sequences per step."""
    out = str(tmp_path_factory.mktemp("world_reference") / "run")
    train.main(tiny_flags(data_dir, out, **WORLD))
    return out


def assert_close_run(ref, out):
    """Another split of the same tokens: same data and schedule, sums in another order."""
    ref_rows = {r["step"]: r for r in curve(ref)}
    rows = curve(out)
    assert rows and all(r["step"] in ref_rows for r in rows)
    for r in rows:
        a = ref_rows[r["step"]]
        assert (r["tokens"], r["lr"]) == (a["tokens"], a["lr"])
        assert r["loss"] == pytest.approx(a["loss"], rel=1e-5)
    wa, wb = ckpt_of(ref)["model"], ckpt_of(out)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


# --- processes with an injected fault ----------------------------------------------------------


@pytest.fixture
def spawn(tmp_path):
    """Start tests/fault_train.py (under torchrun with ranks=2); killed at the end of the test."""
    procs = []

    def start(args, fault, ranks=1, **env):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        env = {**os.environ, "FAULT": fault, "FAULT_DIR": str(tmp_path), **env}
        with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen([sys.executable, *launcher, FAULT_TRAIN, *args], cwd=ROOT, env=env,
                                    stdout=out, stderr=err, start_new_session=True)
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(tmp_path, proc, ranks=(0,), limit_s=180):
    """Pids of the ranks once each has reached its fault."""
    paths = [tmp_path / f"ready.{r}" for r in ranks]
    deadline = time.time() + limit_s
    while not all(p.exists() and p.read_text() for p in paths):
        assert proc.poll() is None, f"exited {proc.returncode} before the fault: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
        assert time.time() < deadline, "the fault was never reached"
        time.sleep(0.02)
    return [int(p.read_text()) for p in paths]


def go(tmp_path):
    (tmp_path / "go").touch()


# --- crash ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_between_steps_then_resume_is_bitwise_exact(data_dir, reference, tmp_path, spawn):
    out = str(tmp_path / "run")
    proc = spawn(tiny_flags(data_dir, out, **EXACT), "hang_at_step:6")
    wait_ready(tmp_path, proc)
    assert ckpt_of(out)["step"] == 4
    assert read_metrics(out)[-1]["step"] == 6  # rows logged after the checkpoint: resume drops them
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT))
    assert_same_run(reference, out)


@pytest.fixture
def busy_cpu():
    """Two busy processes beside the test, on the machine's cores (CI has 2), then gone."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    time.sleep(0.5)
    yield
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_cpu_runs_and_resumes_are_bitwise_under_load(data_dir, reference, tmp_path, spawn, busy_cpu):
    # the machine's load does not change a CPU run's numbers (the thread count does: next test)
    out = str(tmp_path / "loaded")
    train.main(tiny_flags(data_dir, out, **EXACT))
    assert_same_run(reference, out)
    # killed after step 6 under load, then restarted in place, under load
    proc = spawn(tiny_flags(data_dir, str(tmp_path / "killed"), **EXACT), "hang_at_step:6")
    wait_ready(tmp_path, proc)
    proc.kill()
    proc.wait()
    train.main(tiny_flags(data_dir, str(tmp_path / "killed"), **EXACT))
    assert_same_run(reference, tmp_path / "killed")


def test_the_condition_for_bitwise_cpu_runs_is_the_thread_count(finished_run):
    # LayerNorm's backward on the CPU sums its weight and bias gradients per thread, so another
    # thread count rounds them otherwise: runs agree bitwise with the same count, which
    # config.json records beside every run
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g)
    grads = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            ln = torch.nn.LayerNorm(64)
            (ln(x) * w).sum().backward()
            grads.setdefault(n, []).append(ln.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*grads[1]) and not torch.equal(grads[1][0], grads[2][0])
    with open(os.path.join(finished_run, "config.json")) as f:
        env = json.load(f)["env"]
    assert env["threads"] == threads and env["cpus"] >= 1


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(data_dir, reference, tmp_path, spawn):
    out = str(tmp_path / "run")
    proc = spawn(tiny_flags(data_dir, out, **EXACT), "hang_in_save:8")
    wait_ready(tmp_path, proc)
    proc.kill()
    proc.wait()
    (partial,) = glob.glob(os.path.join(out, "ckpt.pt.tmp.*"))  # half of the step-8 checkpoint
    assert os.path.getsize(partial) > 0
    with pytest.raises(UsageError, match="is unreadable"):
        load_checkpoint(partial)  # even named explicitly, half a file is never read as a checkpoint
    assert ckpt_of(out)["step"] == 4
    assert load_model(out)[1]["step"] == 4  # eval.py and sample.py read ckpt.pt, the intact one
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT))
    assert_same_run(reference, out)
    assert not glob.glob(os.path.join(out, "*.tmp.*"))  # the stray temp file was cleaned up


def test_a_row_cut_short_by_a_crash_is_dropped_on_resume(data_dir, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    stop_after(monkeypatch, 5)
    train.main(tiny_flags(data_dir, out, **EXACT))
    monkeypatch.undo()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "tokens": 17')  # kill -9 in the middle of a metrics row
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT))
    assert_same_run(reference, out)


def test_resume_before_the_first_checkpoint_says_what_to_do(data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill before the first checkpoint: metrics.jsonl, no ckpt.pt
    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_flags(data_dir, out, max_iters=2))
    monkeypatch.undo()
    code, err = cli(train.main, tiny_flags(data_dir, out, resume=True), capsys)
    assert code == 2 and "has no checkpoint: the run stopped before its first one; run its original command" in err
    # which is what a restart does: the same command starts it over, its cut-off rows gone
    train.main(tiny_flags(data_dir, out, max_iters=2))
    train.main(tiny_flags(data_dir, str(tmp_path / "clean"), max_iters=2))
    assert curve(out) == curve(tmp_path / "clean")


# --- preemption ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_in_flight_and_exits_0(sig, data_dir, reference, tmp_path, spawn):
    out = str(tmp_path / "run")
    proc = spawn(tiny_flags(data_dir, out, **EXACT), "hang_at_step:5")
    wait_ready(tmp_path, proc)
    proc.send_signal(sig)  # arrives during step 6 (1-indexed)
    go(tmp_path)
    t0 = time.time()
    assert proc.wait(timeout=120) == 0
    assert time.time() - t0 < 60  # the step in flight, a checkpoint, then out: not the remaining 6 steps
    stdout = (tmp_path / "stdout.txt").read_text()
    assert (f"stopped by {sig.name} after step 6; checkpoint saved. "
            f"Resume with: python train.py --resume --out_dir={out}") in stdout
    assert ckpt_of(out)["step"] == 6 and read_metrics(out)[-1]["step"] == 6
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT))
    assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank 1", "launcher"])
def test_torchrun_ranks_agree_on_the_saved_step_and_resume_on_one_process(target, data_dir, world_reference,
                                                                           tmp_path, spawn):
    out = str(tmp_path / "run")
    # 2 ranks x 1 micro-batch of 4: the same 256 tokens per step as the reference's 1 x 2 x 4.
    # Ranks compare their stop flags at logged steps only: every 3rd here.
    proc = spawn(tiny_flags(data_dir, out, **{**WORLD, "log_interval": 3}), "hang_at_step:4", ranks=2)
    pids = wait_ready(tmp_path, proc, ranks=(0, 1))
    os.kill(pids[1] if target == "rank 1" else proc.pid, signal.SIGTERM)  # during step 5
    deadline = time.time() + 60
    while target == "launcher" and (tmp_path / "stderr.txt").read_text().count("closing signal SIGTERM") < 2:
        assert time.time() < deadline, "torchrun did not pass SIGTERM on to its workers"
        time.sleep(0.05)
    go(tmp_path)
    code = proc.wait(timeout=180)
    stdout = (tmp_path / "stdout.txt").read_text()
    if target == "rank 1":  # rank 0 was never signalled: it stops with rank 1, after logged step 6
        assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert "stopped by a signal on another rank after step 6; checkpoint saved. Resume with:" in stdout
    else:  # torchrun itself exits non-zero after a SIGTERM, once its workers have stopped
        assert "stopped by SIGTERM after step 6; checkpoint saved. Resume with:" in stdout
    assert ckpt_of(out)["step"] == 6
    # changed world: resume on one process with 2 micro-batches; same data and schedule
    train.main(tiny_flags(data_dir, out, resume=True, **{**WORLD, "log_interval": 1}))
    assert ckpt_of(out)["step"] == 12
    assert_close_run(world_reference, out)


# --- changed world -------------------------------------------------------------------------------


def test_resume_with_other_micro_batches_continues_the_same_data_and_schedule(data_dir, world_reference,
                                                                             tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    stop_after(monkeypatch, 5)
    train.main(tiny_flags(data_dir, out, **{**WORLD, "batch_size": 8}))  # 1 micro-batch of 8
    monkeypatch.undo()
    assert ckpt_of(out)["step"] == 6
    train.main(tiny_flags(data_dir, out, resume=True, **{**WORLD, "batch_size": 2}))  # 4 of 2
    assert [r["step"] for r in curve(out)] == list(range(1, 13))
    assert_close_run(world_reference, out)


def test_resume_refuses_a_changed_model_or_tokenizer_listing_the_fields(data_dir, finished_run, tmp_path, capsys):
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = cli(train.main, tiny_flags(data_dir, out, resume=True, max_iters=2, total_batch_size=128,
                                           n_layer=3, vocab_size=512), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "cannot resume" in err and "(n_layer: 2 -> 3; vocab_size: 256 -> 512)" in err
    assert snapshot(out) == before


def test_resume_refuses_other_tokens_per_step_or_other_shards(tmp_path, capsys):
    data_dir = make_shards(tmp_path / "data")
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, max_iters=2, total_batch_size=0, batch_size=4))  # 128 tokens/step
    before = snapshot(out)
    code, err = cli(train.main, tiny_flags(data_dir, out, resume=True, max_iters=2, total_batch_size=0,
                                           batch_size=8), capsys)
    assert code == 2 and "it trained 128 tokens per step, these settings give 256" in err
    write_shard(os.path.join(data_dir, "syn", "train_000001.bin"), synthetic_tokens(5000, seed=1))
    code, err = cli(train.main, tiny_flags(data_dir, out, resume=True, max_iters=2, total_batch_size=0,
                                           batch_size=4), capsys)
    assert code == 2 and "(2 files, 45000 tokens) differ from those it trained on (1 files, 40000 tokens)" in err
    assert snapshot(out) == before


def test_checkpoints_of_older_versions_resume_as_they_were_trained(tmp_path, capsys):
    # before the train shards were one stream each shard was read on its own, and before `init`
    # existed every run used GPT-2's init: such a checkpoint must not go on with other tokens or be
    # recorded with today's default init
    data_dir = make_shards(tmp_path / "data", train=(3000, 3000))
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, max_iters=2, init="gpt2"))
    path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    del ckpt["data"]["order"], ckpt["model_config"]["init"]
    torch.save(ckpt, path)
    model, _ = load_model(path)
    assert model.config.init == "gpt2"
    before = snapshot(out)
    code, err = cli(train.main, tiny_flags(data_dir, out, resume=True, max_iters=2), capsys)
    assert code == 2 and "read each of its 2 train shards on its own (an older version's order)" in err
    assert snapshot(out) == before


# --- numerics ------------------------------------------------------------------------------------


class NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def inject_nonfinite(monkeypatch, what, step):
    """Make the loss or only the gradient of 0-indexed `step` non-finite."""
    forward, batch, now = GPT.forward, loader.TrainLoader.batch, {}

    def reading(self, s, micro):  # the step the forward below belongs to
        now["step"] = s
        return batch(self, s, micro)

    def bad_forward(self, idx, targets=None, **objective):  # objective: the forward's loss coefficients
        logits, loss = forward(self, idx, targets, **objective)
        if self.training and now.get("step") == step:
            loss = loss * float("nan") if what == "loss" else NanGradient.apply(loss)
        return logits, loss
    monkeypatch.setattr(loader.TrainLoader, "batch", reading)
    monkeypatch.setattr(GPT, "forward", bad_forward)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_stops_and_keeps_the_last_good_checkpoint(what, data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    inject_nonfinite(monkeypatch, what, 7)
    code, err = cli(train.main, tiny_flags(data_dir, out, checkpoint_interval=4, log_interval=4), capsys)
    assert code == 1 and err.count("\n") == 1
    assert (f"non-finite loss or gradient at step 8: stopping; the last good checkpoint {out}/ckpt.pt, "
            "at step 4, is kept") in err
    ckpt = ckpt_of(out)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_skip_skips_the_update_counts_it_and_still_checkpoints(what, data_dir, tmp_path, monkeypatch,
                                                                         capsys):
    eleven = str(tmp_path / "eleven")
    train.main(tiny_flags(data_dir, eleven, max_iters=11))  # constant lr: steps 1-11 are the same
    out = str(tmp_path / "run")
    inject_nonfinite(monkeypatch, what, 11)  # the last step, which also writes the final checkpoint
    train.main(tiny_flags(data_dir, out, nonfinite="skip"))
    assert "step 12: non-finite loss or gradient, step skipped (1 so far)" in capsys.readouterr().out
    assert read_metrics(out)[-2]["skipped_steps"] == 1  # the step-12 row; then its val row
    ckpt, ref = ckpt_of(out), ckpt_of(eleven)
    assert ckpt["step"] == 12 and ckpt["skipped_steps"] == 1
    for k in ref["model"]:  # the skipped step changed nothing
        assert torch.equal(ckpt["model"][k], ref["model"][k]), k
    for i, state in ref["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, ckpt["optimizer"]["state"][i][name])


# --- long runs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_stays_flat_and_the_run_directory_bounded_over_thousands_of_steps(tmp_path, spawn):
    # 3000 steps of 2048 tokens read 12 MB of shard: a reader that kept its pages (nanoGPT's memmap)
    # or any per-step leak of a few kB would show
    data_dir = make_shards(tmp_path / "data", train=(6_200_000,), vocab=16)
    out = str(tmp_path / "run")
    flags = tiny_flags(data_dir, out, n_layer=1, n_head=1, n_embd=8, block_size=64, vocab_size=16, batch_size=32,
                       total_batch_size=2048, max_iters=3000, log_interval=100, eval_interval=0,
                       checkpoint_interval=100, keep_checkpoints=3)
    proc = spawn(flags, "rss:250", OMP_NUM_THREADS="1")  # one thread: steps stay fast on a busy machine
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    rss = dict(np.loadtxt(tmp_path / "rss.txt", dtype=np.int64))  # step -> kB
    early = np.median([rss[s] for s in (250, 500, 750, 1000)])
    late = np.median([rss[s] for s in (2250, 2500, 2750)])
    assert late - early < 4096, f"resident memory grew by {(late - early) / 1024:.1f} MB: {rss}"
    names = os.listdir(out)
    assert sorted(n for n in names if n.startswith("ckpt")) == \
        ["ckpt.pt", "ckpt_0002800.pt", "ckpt_0002900.pt", "ckpt_0003000.pt"]  # of 30 checkpoints
    assert not glob.glob(os.path.join(out, "*.tmp.*"))


def test_keep_checkpoints_orders_snapshots_by_step(tmp_path):
    for step in (9_999_998, 9_999_999):
        (tmp_path / f"ckpt_{step:07d}.pt").touch()
    (tmp_path / "ckpt_best.pt").touch()  # not a snapshot: never deleted
    (tmp_path / "ckpt.pt").touch()
    rundir.keep_snapshots(str(tmp_path), str(tmp_path / "ckpt.pt"), 10_000_000, 2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt_10000000.pt", "ckpt_9999999.pt", "ckpt_best.pt"]
