import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import train
from gpt_interventions import loader
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.errors import run_main
from gpt_interventions.optimizer import KERNEL_SETTINGS, configure_optimizer, load_optimizer_state
from gpt_interventions.schedule import get_lr
from gpt_interventions.shards import find_shards, read_tokens
from gpt_interventions.training import TrainConfig, make_plan
from helpers import VOCAB, curve, make_shards, read_metrics, stop_after, tiny_flags
from model import GPT, GPTConfig


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path / "data")


def run(data_dir, out_dir, **overrides):
    train.main(tiny_flags(data_dir, str(out_dir), **overrides))
    return str(out_dir)


# --- learning-rate schedule ---------------------------------------------------------------------


def plan_and_config(**kw):
    tc = TrainConfig(**{"max_iters": 100, "max_tokens": 0, "learning_rate": 1e-3, "min_lr": 1e-4, **kw})
    mc = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)
    return make_plan(mc, dataclasses.replace(tc, total_batch_size=0, batch_size=1), 1), tc


def test_cosine_schedule_boundaries():
    plan, tc = plan_and_config(lr_schedule="cosine", warmup_frac=0.05)
    assert plan.warmup_steps == 5
    lrs = [get_lr(s, tc, plan) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[0] > 0  # never 0 at step 0
    assert lrs[4] == pytest.approx(1e-3)  # warmup ends at the peak
    assert lrs[5] == pytest.approx(1e-3)  # cosine starts at the peak
    assert lrs[99] == pytest.approx(1e-4)  # and reaches min_lr at the last step
    assert lrs[52] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)  # halfway: (47/94 of the span)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # monotone decay


def test_constant_schedule_with_warmup_iters():
    plan, tc = plan_and_config(lr_schedule="constant", warmup_iters=10)
    assert [get_lr(s, tc, plan) for s in (0, 9, 10, 99)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])


def test_constant_schedule_without_warmup_is_flat():
    plan, tc = plan_and_config()
    assert {get_lr(s, tc, plan) for s in range(100)} == {1e-3}


def story_schedulers(lr, steps, warmup):
    """The lr of every step as the story's code set it: torch's schedulers, stepped after each step."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.00001, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=lr / 10)],
        milestones=[warmup])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("steps, percent", [(33165, 5), (100, 29), (7, 50)])
def test_story_schedule_is_torchs_linear_then_cosine_at_every_step(steps, percent):
    # the story's stacked runs: lr 0.0014, warmup_period_percent 5, eta_min lr / 10, 33,165 steps
    plan, tc = plan_and_config(max_iters=steps, learning_rate=0.0014, min_lr=0.00014, lr_schedule="story",
                               warmup_frac=percent / 100)
    assert plan.warmup_steps == steps * percent // 100  # floored as its code does (29% of 100: 29)
    ours = [get_lr(s, tc, plan) for s in range(steps)]
    want = story_schedulers(0.0014, steps, plan.warmup_steps)
    assert ours[0] == pytest.approx(0.0014 * 1e-5, rel=1e-12)
    assert max(abs(a - b) / b for a, b in zip(ours, want)) < 1e-12
    if steps == 33165:
        assert plan.warmup_steps == 1658 and ours[1658] == 0.0014 and ours[-1] > 0.00014


# --- training -----------------------------------------------------------------------------------


def test_loss_starts_near_ln_vocab_and_falls(data_dir, tmp_path):
    out = run(data_dir, tmp_path / "run", max_iters=30)
    losses = [r["loss"] for r in curve(out)]
    # PyTorch's default init (the story's) gives logits of variance about 1/3: ln V + 1/6 at first
    assert abs(losses[0] - (math.log(VOCAB) + 1 / 6)) < 0.1
    assert losses[-1] < losses[0] - 1.0
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(vals) == 5 and vals[-1] < vals[0]


def test_run_directory_contents(data_dir, tmp_path):
    out = run(data_dir, tmp_path / "run", max_iters=4)
    assert sorted(os.listdir(out)) == ["charts", "ckpt.pt", "config.json", "log.txt", "metrics.jsonl"]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))  # plain data: weights_only=True loads it
    assert ckpt["step"] == 4 and ckpt["tokens"] == 4 * 256
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    row = read_metrics(out)[0]
    assert set(row) == {"step", "tokens", "loss", "lr", "grad_norm", "clipped", "dt_ms", "tok_per_s", "mfu"}
    assert row["mfu"] is None  # no known peak for a CPU: no invented number


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("batch_size", [4, 2])
@pytest.mark.numerics
def test_gradient_accumulation_gives_the_same_losses(data_dir, tmp_path, batch_size, dropout):
    # 256 tokens per step = 8 sequences of 32: 1 x 8 against 2 x 4 and 4 x 2 micro-batches; with
    # dropout too, as its masks are keyed by each sequence's index in the step
    ref = curve(run(data_dir, tmp_path / "ref", batch_size=8, dropout=dropout))
    other = curve(run(data_dir, tmp_path / "acc", batch_size=batch_size, dropout=dropout))
    assert [r["tokens"] for r in ref] == [r["tokens"] for r in other]
    for a, b in zip(ref, other):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.numerics
def test_same_seed_is_bitwise_deterministic(data_dir, tmp_path):
    a = curve(run(data_dir, tmp_path / "a", dropout=0.1))
    b = curve(run(data_dir, tmp_path / "b", dropout=0.1))
    assert a == b


def test_data_order_is_independent_of_seed_and_data_seed_shuffles(data_dir):
    shards = find_shards(data_dir, "syn", "train")
    plain = loader.TrainLoader(shards, 256, 8, 32, 1, 0, 1, 0, VOCAB)
    x0, _ = plain.batch(0, 0)
    assert (x0.ravel() == read_tokens(shards[0][0], 0, 256)).all()  # first chunk, in order
    shuffled = loader.TrainLoader(shards, 256, 8, 32, 1, 0, 1, 7, VOCAB)
    order = [shuffled.chunk(s) for s in range(plain.chunks)]
    assert sorted(order) == list(range(plain.chunks)) and order != sorted(order)


def test_the_train_shards_are_one_stream_read_across_their_boundaries(tmp_path):
    data_dir = make_shards(tmp_path / "data", train=(1000, 700, 1301))  # boundaries inside chunks
    shards = find_shards(data_dir, "syn", "train")
    stream = np.concatenate([read_tokens(p, 0, n) for p, n in shards])
    S = 2 * 4 * 32  # 2 ranks x 1 micro-batch x 4 rows x 32 tokens
    ranks = [loader.TrainLoader(shards, S, 4, 32, 1, r, 2, 0, VOCAB) for r in range(2)]
    assert ranks[0].chunks == (3001 - 1) // S == 11  # no tail of a shard is skipped, only the stream's
    for step in range(ranks[0].chunks + 2):  # and past the end it starts again
        chunk = stream[(step % 11) * S:][:S + 1]
        for r, ld in enumerate(ranks):
            x, y = ld.batch(step, 0)
            rows = chunk[r * 128:][:129]
            assert (x.ravel() == rows[:-1]).all() and (y.ravel() == rows[1:]).all()


@pytest.mark.numerics
def test_resume_after_sigterm_is_bitwise_exact(data_dir, tmp_path, monkeypatch, capsys):
    overrides = dict(max_iters=12, dropout=0.1, lr_schedule="cosine", warmup_iters=3, grad_clip=1.0)
    full = run(data_dir, tmp_path / "full", **overrides)

    batch = loader.TrainLoader.batch

    def preempt_at_step_5(self, step, micro):
        if step == 5 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by train: checkpoint after this step
        return batch(self, step, micro)
    monkeypatch.setattr(loader.TrainLoader, "batch", preempt_at_step_5)
    part = run(data_dir, tmp_path / "part", **overrides)
    assert load_checkpoint(os.path.join(part, "ckpt.pt"))["step"] == 6
    assert "Resume with: python train.py --resume" in capsys.readouterr().out
    monkeypatch.setattr(loader.TrainLoader, "batch", batch)
    run(data_dir, tmp_path / "part", resume=True, **overrides)

    assert curve(part) == curve(full)
    a, b = load_checkpoint(os.path.join(full, "ckpt.pt")), load_checkpoint(os.path.join(part, "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name in state:
            assert torch.equal(state[name], b["optimizer"]["state"][k][name])


def test_grad_clip_logs_the_preclip_norm_and_clips(data_dir, tmp_path):
    rows = curve(run(data_dir, tmp_path / "clip", grad_clip=0.05, max_iters=3))
    assert all(r["clipped"] and r["grad_norm"] > 0.05 for r in rows)
    free = curve(run(data_dir, tmp_path / "free", max_iters=3))
    assert rows[0]["grad_norm"] == free[0]["grad_norm"]  # same first step: the norm is pre-clip
    assert rows[1]["loss"] != free[1]["loss"]  # clipping changed the update


def test_weight_decay_groups_cover_every_parameter_once():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16,
                                      tie_weights=True, qkv_bias=True))
    for which, decayed in (("all", 16), ("matrices", 6)):  # wte wpe c_attn c_proj c_fc c_proj
        opt = configure_optimizer(model, TrainConfig(decay_params=which), "cpu")
        groups = opt.param_groups
        assert len(groups[0]["params"]) == decayed and groups[0]["weight_decay"] == 0.1
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) == 16


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    forward, batch, now = GPT.forward, loader.TrainLoader.batch, {}

    def reading(self, step, micro):  # the step the forward below belongs to
        now["step"] = step
        return batch(self, step, micro)

    def explode_after_step_6(self, idx, targets=None, **objective):  # objective: the forward's loss coefficients
        logits, loss = forward(self, idx, targets, **objective)
        if self.training and now.get("step") == 7:
            loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(loader.TrainLoader, "batch", reading)
    monkeypatch.setattr(GPT, "forward", explode_after_step_6)
    with pytest.raises(SystemExit) as e:
        run_main(train.main, tiny_flags(data_dir, str(tmp_path / "nan"), checkpoint_interval=4, log_interval=4))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite loss or gradient at step 8" in err and "is kept" in err
    assert load_checkpoint(str(tmp_path / "nan" / "ckpt.pt"))["step"] == 4


def test_deterministic_changes_no_number_on_the_cpu_and_refuses_compiled_cuda(data_dir, tmp_path):
    from gpt_interventions.device import set_deterministic
    from gpt_interventions.errors import UsageError
    try:
        a = curve(run(data_dir, tmp_path / "a", dropout=0.1, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert a == curve(run(data_dir, tmp_path / "b", dropout=0.1))
    with pytest.raises(UsageError, match="add --compile=False"):
        set_deterministic(True, "cuda", compiled=True)


def test_auto_batch_size_finds_the_largest_micro_batch_that_fits_and_a_resume_keeps_it(data_dir, tmp_path,
                                                                                         monkeypatch):
    from gpt_interventions import microbatch
    from gpt_interventions.device import Dist
    from gpt_interventions.errors import UsageError
    tried = []
    trial = microbatch.trial_step

    def small_device(mc, tc, d, batch_size):  # a GPU on which more than 8 sequences do not fit
        tried.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch_size / 10  # its peak, a fraction of the memory: 8 leaves the headroom
    with pytest.raises(UsageError, match="searches a GPU's memory: on the CPU"):
        trial(None, None, Dist(0, 0, 1, "cpu"), 8)
    monkeypatch.setattr(microbatch, "trial_step", small_device)
    flags = dict(total_batch_size=1024, max_iters=4, checkpoint_interval=2, keep_checkpoints=2)  # 32 x 32 a step
    out = run(data_dir, tmp_path / "auto", auto_batch_size=True, **flags)
    assert tried == [4, 16, 8]  # binary search over 1, 2, 4, 8, 16, 32
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["train"]["batch_size"] == 8 and config["derived"]["accum"] == 4
    assert "micro-batch: 8 sequences, by --auto_batch_size (the largest that fits on cpu)" in \
        open(os.path.join(out, "log.txt")).read()
    assert curve(out) == curve(run(data_dir, tmp_path / "eight", batch_size=8, **flags))
    # a restart (the same command, after a crash past step 2) keeps its micro-batch, without trials
    os.replace(os.path.join(out, "ckpt_0000002.pt"), os.path.join(out, "ckpt.pt"))
    monkeypatch.setattr(microbatch, "trial_step", lambda *a: pytest.fail("a resumed run searched again"))
    run(data_dir, tmp_path / "auto", auto_batch_size=True, **flags)
    assert curve(out) == curve(tmp_path / "eight")


def test_a_resume_on_another_thread_count_and_a_restart_budget_without_the_store_fix_are_told(data_dir, tmp_path,
                                                                                             monkeypatch):
    flags = dict(max_iters=4, checkpoint_interval=2, keep_checkpoints=2)
    out = run(data_dir, tmp_path / "run", **flags)
    os.replace(os.path.join(out, "ckpt_0000002.pt"), os.path.join(out, "ckpt.pt"))  # as if stopped at step 2
    threads = torch.get_num_threads()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    try:
        torch.set_num_threads(threads + 1)
        run(data_dir, tmp_path / "run", **flags)  # the same command: continues from step 2
    finally:
        torch.set_num_threads(threads)
    log = open(os.path.join(out, "log.txt")).read()
    assert f"note: the run used {threads} CPU threads and goes on with {threads + 1}" in log
    assert "launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in log


# --- resuming on another device type -------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("written_on, resumed_on", [("cpu", "cuda"), ("cuda", "cpu")], ids=["cpu-to-cuda", "cuda-to-cpu"])
def test_resume_takes_the_optimizer_kernel_of_the_device_it_resumes_on(data_dir, tmp_path, monkeypatch, optimizer,
                                                                      written_on, resumed_on):
    # configure_optimizer builds a fused AdamW on CUDA; the CPU runs it too, so both ends of a
    # float16 run that moves between device types run here: "cuda" is the optimizer CUDA builds
    flags = dict(dtype="float16", optimizer=optimizer, max_iters=4, total_batch_size=128)
    out = str(tmp_path / "run")

    def as_on(device_type):
        monkeypatch.setattr(train, "configure_optimizer", lambda model, tc, _: configure_optimizer(model, tc, device_type))
    as_on(written_on)
    stop_after(monkeypatch, 1)
    run(data_dir, out, **flags)
    monkeypatch.undo()
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["optimizer"]["param_groups"][0]["fused"] == (written_on == "cuda")

    model = GPT(GPTConfig(**ckpt["model_config"]))
    resumed = configure_optimizer(model, TrainConfig(**ckpt["train_config"]), resumed_on)
    fresh = [{k: g[k] for k in KERNEL_SETTINGS if k in g} for g in resumed.param_groups]
    load_optimizer_state(resumed, ckpt["optimizer"])
    again = resumed.state_dict()
    for group, saved, kernel in zip(again["param_groups"], ckpt["optimizer"]["param_groups"], fresh):
        assert {k: group[k] for k in kernel} == kernel  # the resuming device's kernel
        assert {k: v for k, v in group.items() if k not in kernel} == {k: v for k, v in saved.items() if k not in kernel}
    assert again["state"].keys() == ckpt["optimizer"]["state"].keys()
    for i, state in ckpt["optimizer"]["state"].items():
        assert again["state"][i].keys() == state.keys()
        for name, t in state.items():
            assert torch.equal(again["state"][i][name], t), (i, name)

    as_on(resumed_on)  # the run itself steps on (a float16 GradScaler hands found_inf to fused AdamW only)
    run(data_dir, out, resume=True, **flags)
    assert [r["step"] for r in curve(out)] == [1, 2, 3, 4]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["optimizer"]["param_groups"][0]["fused"] == (resumed_on == "cuda")
