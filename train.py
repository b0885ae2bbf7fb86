"""Train a GPT-2-shaped model with interventions switched by flags.

    python train.py [config/PRESET.toml | STORY_RUN_DIR ...] [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/best.toml

Precedence: dataclass defaults (the story's baseline) < presets < flags. `--help` lists them all.
A preset is a TOML file, or one of the story's run directories (model.json and train.json, read
by gpt_interventions/story_runs.py).
The loop in `train` reads as the story of a step (lr, batches, forward and backward, update);
its bookkeeping (log, evaluate, checkpoint, stop) is in named functions below it that get their
state in one `Training` object.
"""

import dataclasses
import json
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from gpt_interventions.atomic import write_json
from gpt_interventions.branch import start_branch
from gpt_interventions.checkpoint import CHECKPOINT_VERSION, save_checkpoint
from gpt_interventions.cli import split_flags
from gpt_interventions.device import (
    Dist,
    autocast,
    peak_flops,
    print0,
    set_deterministic,
    set_tf32,
    setup_dist,
    teardown_dist,
)
from gpt_interventions.dropout import RULE as DROPOUT_RULE
from gpt_interventions.errors import RunError, UsageError, run_main
from gpt_interventions.evaluation import evaluate
from gpt_interventions.loader import TrainLoader, eval_windows, read_windows
from gpt_interventions.microbatch import largest_micro_batch, rows_per_rank
from gpt_interventions.moe import routing_batch, routing_fractions
from gpt_interventions.optimizer import configure_optimizer, load_optimizer_state
from gpt_interventions.provenance import environment
from gpt_interventions.resolve import check_same_data, resolve_config
from gpt_interventions.rundir import Run, keep_snapshots
from gpt_interventions.schedule import get_lr
from gpt_interventions.shards import find_shards
from gpt_interventions.step import accumulate_gradients, wrap_model
from gpt_interventions.story_runs import describe
from gpt_interventions.trackers import check_trackers
from gpt_interventions.training import Plan, TrainConfig, kept_steps, make_plan
from model import GPT, GPTConfig

USAGE = "[config/PRESET.toml | STORY_RUN_DIR ...] [--key=value ...]"


def main(argv):
    mc, tc, ckpt = resolve_config(argv, USAGE)
    check_trackers(tc.tracker)
    story_runs = [describe(p) for p in split_flags(argv)[0] if os.path.isdir(p)]  # run directories given
    if tc.dry_run:
        return dry_run(mc, tc, story_runs)
    d = setup_dist(tc.device)
    with StopSignals() as stop:
        train(mc, tc, ckpt, d, stop, story_runs)
    teardown_dist()


def dry_run(mc, tc, story_runs=()):
    """What a run will do and cost, before paying for it: the resolved config and the derived plan
    as one JSON object (config.json's model, train and derived; and the story's run directories
    given, with the keys of theirs that change nothing here). Reads no data, writes nothing."""
    world_size = os.environ.get("WORLD_SIZE", "1")  # WORLD_SIZE=8 python train.py ... --dry_run
    if not world_size.isdigit() or int(world_size) < 1:
        raise UsageError(f"WORLD_SIZE={world_size!r}: give the number of ranks the run will have, e.g. WORLD_SIZE=8")
    world_size = int(world_size)
    planned = tc  # --auto_batch_size: the micro-batch is found on the device; plan with one a step
    if tc.auto_batch_size:
        planned = dataclasses.replace(tc, batch_size=rows_per_rank(mc, tc, world_size))
    plan = make_plan(mc, planned, world_size)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: one plan, from rank 0
        return
    with torch.device("meta"):  # the parameter count without allocating the weights
        model = GPT(mc)
    plan_of = derived(tc, plan, world_size, model)
    if tc.auto_batch_size:
        plan_of.update(micro_batch="auto", accum="auto")
    shown = {"model": asdict(mc), "train": asdict(tc), "derived": plan_of}
    if story_runs:
        shown["story_runs"] = list(story_runs)
    print(json.dumps(shown, indent=2))


def derived(tc, plan, world_size, model):
    """The plan in numbers, as config.json records it and --dry_run prints it."""
    flops = model.flops_per_token()
    return {"ranks": world_size, "micro_batch": tc.batch_size, **asdict(plan), "num_params": model.num_params(),
            "flops_per_token": flops, "run_flops": flops * plan.tokens_per_step * plan.max_steps}


def agree_on_start(ckpt, d, tc):
    """The step the run starts from, the same on every rank: each rank read the run directory on
    its own, and ranks that see different checkpoints (a directory on each node's own disk) must
    not train together. Refused in one line on every rank."""
    start = ckpt["step"] if ckpt else 0
    if d.world_size > 1:
        seen = torch.tensor([start, -start], dtype=torch.long, device=d.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen[0].item() != -seen[1].item():
            raise UsageError(f"the ranks found different checkpoints in {tc.out_dir} (steps {-seen[1].item()} to "
                             f"{seen[0].item()}): a run directory must be on storage that every node shares")
    return start


def micro_batch(mc, tc, ckpt, d):
    """--auto_batch_size: a resumed run keeps the micro-batch it had; a new one finds the largest
    that fits (gpt_interventions/microbatch.py)."""
    rows = rows_per_rank(mc, tc, d.world_size)
    if ckpt is not None and rows % ckpt["train_config"]["batch_size"] == 0:
        return ckpt["train_config"]["batch_size"]
    return largest_micro_batch(mc, tc, d, rows)


class StopSignals:
    """SIGTERM and SIGINT (a preempted instance, Ctrl-C) ask the loop to checkpoint and stop after
    the step in flight; a second signal stops at once. The previous handlers come back on exit."""

    def __init__(self):
        self.signal = None  # the name of the signal received, if any
        self.previous = {}

    def __enter__(self):
        return self

    def arm(self):
        """From here on a signal asks for a stop (during setup it stops at once, as by default)."""
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self.previous:
            signal.signal(s, self._received)

    def _received(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclass
class Training:
    """The state of a run that its bookkeeping reads and writes: what a checkpoint saves, where the
    run writes, and the counters that span steps."""
    mc: GPTConfig
    tc: TrainConfig
    plan: Plan
    d: Dist
    model: GPT                      # the plain module: checkpoints save it, never a compiled or DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    shards: list                    # the train shards, (path, tokens): a resume must find the same
    loader: TrainLoader
    run: Run
    saved_step: int | None          # step of the checkpoint on disk
    skipped: int = 0                # steps skipped by --nonfinite=skip
    bad_step: torch.Tensor = None   # first step with a non-finite loss, -1 if none; kept on the device
    clock: tuple = (0.0, 0)         # (time, step) of the last logged row
    peak: float | None = None       # the device's peak FLOP/s at this dtype, for MFU; None: unknown
    routing_x: torch.Tensor = None  # with experts: the fixed validation tokens their routing is logged on
    kept: frozenset = frozenset()   # --keep_steps: steps checkpointed and kept as ckpt_STEP.pt
    branch: dict | None = None      # a branched run's parent (gpt_interventions/branch.py)


def train(mc, tc, ckpt, d, stop, story_runs=()):
    start = agree_on_start(ckpt, d, tc)
    set_tf32(tc.tf32)
    set_deterministic(tc.deterministic, d.device_type, tc.compile)  # before any matmul, trials included
    if tc.auto_batch_size:  # every other flag and the data are checked before any trial step
        rows = rows_per_rank(mc, tc, d.world_size)
        make_plan(mc, dataclasses.replace(tc, batch_size=rows), d.world_size)
        find_shards(tc.data_dir, tc.dataset, "train"), find_shards(tc.data_dir, tc.dataset, "val")
        tc = dataclasses.replace(tc, batch_size=micro_batch(mc, tc, ckpt, d))
    plan = make_plan(mc, tc, d.world_size)
    shards = find_shards(tc.data_dir, tc.dataset, "train")
    loader = TrainLoader(shards, plan.tokens_per_step, tc.batch_size, mc.block_size, plan.accum,
                         d.rank, d.world_size, tc.data_seed, mc.vocab_size)
    windows = eval_windows(find_shards(tc.data_dir, tc.dataset, "val"), mc.block_size, tc.eval_tokens)
    if ckpt is not None:
        check_same_data(ckpt["data"], shards, plan, tc)
    loader.batch(start, 0)  # token ids outside vocab_size: refused before anything is written,
    read_windows(windows, mc.block_size, mc.vocab_size)  # not mid-run
    if ckpt is not None and start >= plan.max_steps:  # a restart after the end: nothing to redo
        print0(f"{tc.out_dir} is finished ({start} of {plan.max_steps} steps): nothing to do")
        return

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(d.device)
    optimizer = configure_optimizer(model, tc, d.device_type)
    scaler = torch.amp.GradScaler(d.device_type, enabled=tc.dtype == "float16")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt is not None and ckpt.get("branching") and d.master:
        start_branch(tc.out_dir, ckpt["branch"])
    run = Run(tc, d.master, start)  # rows logged after the checkpoint (all, without one) are logged again
    t = Training(mc, tc, plan, d, model, optimizer, scaler, shards, loader, run,
                 saved_step=start if ckpt else None, skipped=ckpt.get("skipped_steps", 0) if ckpt else 0,
                 bad_step=torch.full((), -1, dtype=torch.long, device=d.device), peak=peak_flops(d.device, tc.dtype),
                 routing_x=routing_batch(windows, mc, tc.eval_batch_size or tc.batch_size, d.device),
                 kept=frozenset(kept_steps(tc)), branch=ckpt.get("branch") if ckpt else None)
    record_start(t, start, ckpt, story_runs=story_runs)

    fwd_model, ddp_model = wrap_model(model, tc, d)
    ctx = autocast(d.device_type, tc.dtype)
    model.train()
    stop.arm()
    t.clock = (time.time(), start)
    for step in range(start, plan.max_steps):
        lr = get_lr(step, tc, plan)  # learning_rate's: the logged lr
        for group in optimizer.param_groups:  # each group from its own peak (AdamW's, Muon's)
            group["lr"] = get_lr(step, tc, plan, group["peak_lr"])
        batches = (loader.batch(step, micro) for micro in range(plan.accum))
        loss_sum, norm = accumulate_gradients(ddp_model, model, optimizer, scaler, batches, plan.accum,
                                              ctx, d, tc, step)
        update(t, step, loss_sum, norm)

        done = step + 1
        last = done == plan.max_steps
        stopping = agree_to_stop(t, done, last, stop)
        saving = last or stopping or done % tc.checkpoint_interval == 0 or done in t.kept
        if done % tc.log_interval == 0 or saving:
            log_step(t, done, lr, loss_sum, norm)
        if (tc.eval_interval and done % tc.eval_interval == 0) or last:
            validate(t, done, fwd_model, windows)
        if saving:
            checkpoint(t, done)
        if stopping and not last:
            run.log(f"stopped by {stop.signal or 'a signal on another rank'} after step {done}; checkpoint "
                    f"saved. Resume with: python train.py --resume --out_dir={tc.out_dir}")
            run.trackers.close()
            return
    finish(t)


# ----------------------------------------------------------------------------------------------
# the loop's bookkeeping


def record_start(t, start, ckpt, story_runs=()):
    """config.json (resolved config, derived values, environment; the story's run directories given
    as presets) and the run's first log lines."""
    num_params, resumed = t.model.num_params(), ckpt is not None and not ckpt.get("branching")
    config_path = os.path.join(t.tc.out_dir, "config.json")
    before = None
    if resumed and os.path.isfile(config_path):
        with open(config_path) as f:
            before = json.load(f).get("env", {}).get("threads")
    if t.d.master:
        config = {"model": asdict(t.mc), "train": asdict(t.tc),
                  "derived": derived(t.tc, t.plan, t.d.world_size, t.model), "env": environment(t.d.device),
                  **({"branch": t.branch} if t.branch else {}),
                  **({"story_runs": list(story_runs)} if story_runs else {})}
        write_json(config_path, config)
        t.run.trackers.config(config, start)
    t.run.log(f"{'resuming' if resumed else 'starting'} {t.tc.out_dir} at step {start}: {num_params:,} parameters, "
              f"{t.plan.tokens_per_step:,} tokens/step = {t.d.world_size} ranks x {t.plan.accum} micro-batches x "
              f"{t.tc.batch_size} x {t.mc.block_size}, {t.plan.max_steps} steps")
    t.run.log("config: " + json.dumps({**asdict(t.mc), **asdict(t.tc)}))
    if t.branch:
        t.run.log(f"branched from {t.branch['from']} at step {t.branch['step']} ({t.branch['checkpoint']}, "
                  f"sha256 {t.branch['sha256']})")
    for story in story_runs:
        ignored = ", ".join(f"{k}={v}" for k, v in story["ignored"].items()) or "none"
        t.run.log(f"preset {story['dir']}: the story's run on {story['gpus'] or 'an unnamed number of'} GPU(s); "
                  f"ignored, as they change nothing here: {ignored}")
    if t.d.device_type == "cpu" and before not in (None, torch.get_num_threads()):
        t.run.log(f"note: the run used {before} CPU threads and goes on with {torch.get_num_threads()}: its numbers "
                  "will differ from an uninterrupted run's in the last bits (set OMP_NUM_THREADS to match)")
    if ckpt is not None and t.mc.dropout > 0 and ckpt.get("rng", {}).get("dropout") != DROPOUT_RULE:
        t.run.log(f"note: the checkpoint drew dropout masks per (step, rank) in micro-batch order; from step "
                  f"{start} on they are drawn per sequence (seed, step, index in the step): a change of rule mid-run")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and \
            os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        t.run.log("warning: torchrun may restart this run, but its restarted ranks can fail to reconnect through "
                  "the store it shares with them (pytorch#135712); launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    if t.tc.auto_batch_size:
        t.run.log(f"micro-batch: {t.tc.batch_size} sequences, by --auto_batch_size ({'kept from the checkpoint' if resumed else f'the largest that fits on {t.d.device}'})")
    if t.plan.max_steps > t.loader.chunks:  # allowed (small corpora), but never unannounced
        t.run.log(f"note: the train split holds {t.loader.chunks:,} steps of tokens and this run takes "
                  f"{t.plan.max_steps:,}: from step {t.loader.chunks + 1:,} on it reads the same tokens again "
                  f"(epoch 2 and on{', reshuffled' if t.tc.data_seed else ''})")


def update(t, step, loss_sum, norm):
    """The optimizer step, unless the loss or gradient is not finite: --nonfinite=stop notes the
    step (on the device, no sync) and the next log stops the run; skip leaves the weights as they are."""
    finite = torch.isfinite(loss_sum)
    if not t.scaler.is_enabled():  # with float16 the GradScaler itself skips overflowing steps
        finite &= torch.isfinite(norm)
    if t.tc.nonfinite == "skip" and not finite.item():  # opt-in: costs one sync per step
        t.skipped += 1  # no update; the step is still logged, evaluated and checkpointed
        t.run.log(f"step {step + 1}: non-finite loss or gradient, step skipped ({t.skipped} so far)")
    else:
        t.bad_step = torch.where((t.bad_step < 0) & ~finite, step + 1, t.bad_step)
        t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)


def agree_to_stop(t, done, last, stop):
    """Whether to stop after this step (a signal); raises if rank 0 could not append to its logs.
    Under DDP the ranks compare at logged steps only, so that they all stop at the same step."""
    stopping, failed = stop.signal is not None, t.run.failed is not None
    if t.d.world_size > 1:
        if done % t.tc.log_interval == 0 or last:
            flags = torch.tensor([stopping, failed], dtype=torch.int32, device=t.d.device)
            dist.all_reduce(flags)
            stopping, failed = bool(flags[0].item()), bool(flags[1].item())
        else:
            stopping = failed = False
    if failed:  # rank 0 could not append to log.txt or metrics.jsonl: stop, as after a crash
        raise RunError(_append_failed(t.run.failed, done, t.saved_step, t.tc) if t.run.failed else
                       "rank 0 could not append to its logs; see its error")
    return stopping


def log_step(t, done, lr, loss_sum, norm):
    """A metrics.jsonl row and a log line: loss (mean over every rank's micro-batches), lr, norm,
    speed. Stops the run first if a step since the last log had a non-finite loss."""
    if t.bad_step.item() >= 0:
        _diverged(t.tc, int(t.bad_step.item()), t.saved_step)
    loss_mean = loss_sum / t.plan.accum
    if t.d.world_size > 1:
        dist.all_reduce(loss_mean)
        loss_mean /= t.d.world_size
    now, (then, step_then) = time.time(), t.clock
    dt = (now - then) / (done - step_then)
    t.clock = (now, done)
    peak, flops_per_step = t.peak, t.model.flops_per_token() * t.plan.tokens_per_step
    row = {"step": done, "tokens": done * t.plan.tokens_per_step, "loss": loss_mean.item(),
           "lr": lr, "grad_norm": norm.item(), "clipped": bool(t.tc.grad_clip > 0 and norm.item() > t.tc.grad_clip),
           "dt_ms": dt * 1000, "tok_per_s": t.plan.tokens_per_step / dt,
           "mfu": flops_per_step / dt / (peak * t.d.world_size) if peak else None}
    if t.skipped:
        row["skipped_steps"] = t.skipped
    if t.routing_x is not None and t.d.master:  # per layer, each expert's share of the token assignments
        with autocast(t.d.device_type, t.tc.dtype):
            row["expert_frac"] = routing_fractions(t.model, t.routing_x)
        t.clock = (time.time(), done)  # the measurement is not training time
    t.run.metrics(row)
    mfu = f"{row['mfu'] * 100:.1f}%" if peak else "n/a"
    t.run.log(f"step {done}/{t.plan.max_steps} loss {row['loss']:.6f} lr {lr:.3e} norm {row['grad_norm']:.4f}"
              f"{' (clipped)' if row['clipped'] else ''} dt {row['dt_ms']:.0f}ms "
              f"tok/s {row['tok_per_s']:,.0f} mfu {mfu}")


def validate(t, done, fwd_model, windows):
    """The validation loss on the same fixed tokens every time, as eval.py scores them."""
    val_loss, val_tokens = evaluate(fwd_model, windows, t.tc.eval_batch_size or t.tc.batch_size,
                                    t.d.device, t.tc.dtype, t.d.rank, t.d.world_size)
    t.run.metrics({"step": done, "tokens": done * t.plan.tokens_per_step, "val_loss": val_loss,
                   "val_tokens": val_tokens})
    t.run.log(f"step {done} val loss {val_loss:.6f} on {val_tokens:,} tokens")


def checkpoint(t, done):
    """Write ckpt.pt on rank 0 (atomically; snapshots if asked); every rank learns if it failed."""
    error = None
    if t.run.failed:  # a checkpoint past rows missing from metrics.jsonl would leave a gap on resume
        error = _append_failed(t.run.failed, done, t.saved_step, t.tc)
    if t.d.master and error is None:
        path = os.path.join(t.tc.out_dir, "ckpt.pt")
        try:
            save_checkpoint(path, checkpoint_state(t, done))
        except OSError as e:  # a full disk, a lost mount: atomic_write left the previous file as it was
            error = (f"cannot write checkpoint {path} at step {done} ({e.strerror or e}); " +
                     (f"the previous checkpoint, at step {t.saved_step}, is intact" if t.saved_step is not None
                      else "no checkpoint was written"))
        else:
            t.saved_step = done
            if t.tc.keep_checkpoints or done in t.kept:
                keep_snapshots(t.tc.out_dir, path, done, t.tc.keep_checkpoints, t.kept)
    if t.d.world_size > 1:  # doubles as the barrier: every rank learns whether the write failed
        failed = torch.tensor([error is not None], dtype=torch.int32, device=t.d.device)
        dist.all_reduce(failed)
        error = error or (failed.item() and "rank 0 could not write the checkpoint or its logs; see its error")
    if error:
        raise RunError(error)


def checkpoint_state(t, step):
    """The checkpoint as plain data: configs, state dicts, and where the run is."""
    return {
        "format": "gpt-interventions", "version": CHECKPOINT_VERSION,
        "model_config": asdict(t.mc), "train_config": asdict(t.tc),
        "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(), "step": step, "tokens": step * t.plan.tokens_per_step,
        "data": {"dataset": t.tc.dataset, "tokens_per_step": t.plan.tokens_per_step, "order": "stream",
                 "data_seed": t.tc.data_seed, "epoch": t.loader.epoch_of(step),
                 "shards": [[os.path.basename(p), n] for p, n in t.shards]},
        "rng": {"scheme": "dropout masks from (seed, step, sequence index in the step)", "dropout": DROPOUT_RULE,
                "seed": t.tc.seed},
        "skipped_steps": t.skipped,
        **({"branch": t.branch} if t.branch else {}),
    }


def finish(t):
    t.run.log(f"done: {t.plan.max_steps} steps, checkpoint {os.path.join(t.tc.out_dir, 'ckpt.pt')}")
    if t.tc.charts and t.d.master:  # last, after the checkpoint: drawing can cost the run nothing
        from gpt_interventions.charts import plot_run  # lazily: matplotlib only loads for a finished run
        paths = plot_run(t.tc.out_dir)
        t.run.log(f"charts: {', '.join(paths)}")
        t.run.trackers.images(paths, t.plan.max_steps)
    t.run.trackers.close()


def _append_failed(why, step, saved_step, tc):
    return (f"{why}, stopped after step {step}; " +
            (f"the checkpoint at step {saved_step} is intact" if saved_step is not None else "no checkpoint was written")
            + f": free space, then resume with: python train.py --resume --out_dir={tc.out_dir}")


def _diverged(tc, step, saved_step):
    ckpt = os.path.join(tc.out_dir, "ckpt.pt")
    kept = f"the last good checkpoint {ckpt}, at step {saved_step}, is kept" if saved_step is not None \
        else "no checkpoint was written"
    raise RunError(f"non-finite loss or gradient at step {step}: stopping; {kept}. Lower "
                     "--learning_rate, set --grad_clip, or use --nonfinite=skip")


if __name__ == "__main__":
    run_main(main)
