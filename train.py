"""Train a GPT-2-shaped model with interventions switched by flags.

    python train.py [config/PRESET.toml ...] [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/best.toml

Precedence: dataclass defaults (the story's baseline) < presets < flags. `--help` lists them all.
"""

import dataclasses
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (CHECKPOINT_VERSION, RunError, UsageError, autocast, environment, field, load_checkpoint,
                    parse_config, peak_flops, run_main, save_checkpoint, set_tf32, setup_dist, teardown_dist,
                    write_json)
from data import TrainLoader, eval_windows, find_shards, read_windows
from eval import evaluate
from model import GPT, GPTConfig
from rundir import Run, keep_snapshots

USAGE = "[config/PRESET.toml ...] [--key=value ...]"


@dataclass
class TrainConfig:
    run_name: str = field("", "run name; default: the last preset's file name, else 'run'")
    out_dir: str = field("", "run directory; default out/<run_name>")
    resume: bool = field(False, "continue the run in out_dir from its ckpt.pt")
    # data
    dataset: str = field("fineweb", "dataset directory under data_dir (made by prepare_data.py)")
    data_dir: str = field("data", "root of the prepared datasets")
    data_seed: int = field(0, "0: chunks in order through the shards; N > 0: shuffled per epoch")
    # batch and length
    batch_size: int = field(16, "micro-batch size in sequences, per rank")
    total_batch_size: int = field(524288, "tokens per optimizer step; 0: one micro-batch per rank")
    gradient_accumulation_steps: int = field(0, "micro-batches per step per rank; 0: derived")
    max_iters: int = field(0, "optimizer steps; 0: from max_tokens")
    max_tokens: int = field(3_260_000_000, "training tokens, rounded up to whole steps")
    # optimizer and schedule
    learning_rate: float = field(4e-4, "peak learning rate (AdamW)")
    lr_schedule: str = field("constant", "after warmup: constant, or cosine to min_lr at the last step",
                             choices=("constant", "cosine"))
    warmup_iters: int = field(0, "linear warmup steps; 0: use warmup_frac")
    warmup_frac: float = field(0.0, "linear warmup as a fraction of the run's steps")
    min_lr: float = field(4e-5, "learning rate at the last step of the cosine schedule")
    weight_decay: float = field(0.1, "AdamW decoupled weight decay")
    decay_params: str = field("all", "which parameters decay: all (as the story's code) or matrices",
                              choices=("all", "matrices"))
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.999, "AdamW beta2")
    eps: float = field(1e-8, "AdamW epsilon")
    grad_clip: float = field(0.0, "clip the global gradient norm to this; 0: off (norm still logged)")
    # numerics and speed
    dtype: str = field("bfloat16", "autocast dtype; float16 adds a GradScaler",
                       choices=("float32", "bfloat16", "float16"))
    tf32: bool = field(True, "TF32 matmuls for float32 work on Ampere+ GPUs")
    compile: bool = field(True, "torch.compile the model")
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    seed: int = field(1337, "seed of the initial weights and of dropout")
    nonfinite: str = field("stop", "on a non-finite loss or gradient: stop the run, or skip the step",
                           choices=("stop", "skip"))
    # logging, evaluation, checkpoints
    log_interval: int = field(10, "steps between logged metrics rows")
    eval_interval: int = field(250, "steps between validation evaluations; 0: only at the end")
    eval_tokens: int = field(2_097_152, "validation token budget (the same tokens every time)")
    eval_batch_size: int = field(0, "sequences per evaluation batch; 0: batch_size")
    checkpoint_interval: int = field(500, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = field(0, "also keep the last N checkpoints as ckpt_STEP.pt; 0: only ckpt.pt")
    charts: bool = field(True, "draw the run's curves as PNG files in out_dir/charts/ when it finishes")


POSITIVE = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "log_interval",
            "checkpoint_interval", "learning_rate"}
FRACTIONS = {"dropout", "beta1", "beta2"}  # in [0, 1)

# Fields that may differ when a run is resumed: they change how, not what, it computes.
RUNTIME_FIELDS = {"resume", "out_dir", "run_name", "data_dir", "batch_size",
                  "gradient_accumulation_steps", "compile", "device", "log_interval",
                  "eval_interval", "eval_batch_size", "checkpoint_interval", "keep_checkpoints",
                  "nonfinite", "charts"}
# max_iters/max_tokens are not among them: the cosine schedule of the remaining steps depends on them.


@dataclass
class Plan:
    """Values derived once from the config and the world size."""
    accum: int
    tokens_per_step: int
    max_steps: int
    warmup_steps: int


def make_plan(mc, tc, world_size):
    for name, value in [*asdict(mc).items(), *asdict(tc).items()]:  # every number is finite and >= 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0 or (name in POSITIVE and value == 0):
            raise UsageError(f"--{name} must be {'positive' if name in POSITIVE else '0 or more'}, got {value}")
        if name in FRACTIONS and value >= 1:
            raise UsageError(f"--{name} must be in [0, 1), got {value}")
        if name in ("seed", "data_seed") and value >= 2**63:
            raise UsageError(f"--{name} must be less than 2**63, got {value}")
    if mc.n_embd % mc.n_head:
        raise UsageError(f"n_embd {mc.n_embd} is not divisible by n_head {mc.n_head}")
    micro = tc.batch_size * mc.block_size * world_size  # tokens in one micro-batch over all ranks
    if tc.total_batch_size:
        if tc.total_batch_size % micro:
            raise UsageError(f"total_batch_size {tc.total_batch_size} is not divisible into micro-batches "
                             f"of batch_size*block_size*ranks = {micro} tokens")
        accum = tc.total_batch_size // micro
        if tc.gradient_accumulation_steps and tc.gradient_accumulation_steps != accum:
            raise UsageError(f"gradient_accumulation_steps {tc.gradient_accumulation_steps} contradicts "
                             f"total_batch_size {tc.total_batch_size} (which gives {accum}); set one of them")
    else:
        accum = tc.gradient_accumulation_steps or 1
    tokens_per_step = micro * accum
    if tc.max_iters < 0 or tc.max_tokens < 0 or not (tc.max_iters or tc.max_tokens):
        raise UsageError("set a positive --max_iters or --max_tokens")
    max_steps = tc.max_iters or math.ceil(tc.max_tokens / tokens_per_step)
    warmup = tc.warmup_iters or round(tc.warmup_frac * max_steps)
    if not 0 <= tc.warmup_frac <= 1 or warmup < 0 or warmup > max_steps:
        raise UsageError(f"warmup of {warmup} steps does not fit a run of {max_steps} steps")
    return Plan(accum, tokens_per_step, max_steps, warmup)


def get_lr(step, tc, plan):
    """Learning rate of 0-indexed `step`: linear warmup (never 0), then constant or cosine."""
    if step < plan.warmup_steps:
        return tc.learning_rate * (step + 1) / plan.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.learning_rate
    span = plan.max_steps - 1 - plan.warmup_steps
    progress = (step - plan.warmup_steps) / span if span > 0 else 1.0
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.learning_rate - tc.min_lr)


def configure_optimizer(model, tc, device_type):
    """AdamW with a decay and a no-decay group; every parameter in exactly one group."""
    params = dict(model.named_parameters())  # a tied weight appears once
    if tc.decay_params == "all":
        decay, no_decay = list(params.values()), []
    else:  # matrices (Linear weights, embeddings) decay; biases and LayerNorm gains do not
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)) == len(params), "each parameter must be optimised exactly once"
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=device_type == "cuda")


def wrap_model(model, tc, d):
    """(compiled model, its DDP wrapper or itself): compile first, then DDP; `model` stays the
    plain module that checkpoints save."""
    fwd_model = torch.compile(model) if tc.compile else model
    if d.world_size == 1:
        return fwd_model, fwd_model
    return fwd_model, DDP(fwd_model, device_ids=[d.local_rank] if d.device_type == "cuda" else None)


def to_device(arrays, device):
    """numpy batch -> device tensors; on CUDA through pinned memory, so the copy does not block."""
    tensors = [torch.from_numpy(a) for a in arrays]
    if device.startswith("cuda"):
        tensors = [t.pin_memory() for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


def accumulate_gradients(ddp_model, model, optimizer, scaler, batches, accum, ctx, d, grad_clip):
    """Forward and backward over one step's micro-batches, then unscale and clip.

    Returns (sum of the micro-batch mean losses, pre-clip global gradient norm), both still on
    the device: nothing here waits for the device, so the next batch is read while it works.
    bench.py times exactly this function.
    """
    loss_sum = torch.zeros((), device=d.device)
    for micro, arrays in enumerate(batches):
        x, y = to_device(arrays, d.device)
        # DDP all-reduces gradients only on the last micro-batch
        sync = ddp_model.no_sync() if d.world_size > 1 and micro < accum - 1 else nullcontext()
        with sync:
            with ctx:
                _, loss = ddp_model(x, y)
            loss_sum += loss.detach()
            scaler.scale(loss / accum).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)  # pre-clip global norm
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, norm)
    return loss_sum, norm


def step_seed(seed, step, rank):
    """Dropout RNG seed of one step on one rank: resume needs no RNG state to be bitwise exact."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def resolve_config(argv):
    """(GPTConfig, TrainConfig, checkpoint or None) from presets, flags and, on resume, the run."""
    classes = [GPTConfig, TrainConfig]
    (mc, tc), _, _ = parse_config(argv, classes, "train.py", USAGE)
    presets = [a for a in argv if a.endswith(".toml")]
    run_name = tc.run_name or (os.path.splitext(os.path.basename(presets[-1]))[0] if presets else "run")
    out_dir = tc.out_dir or os.path.join("out", run_name)
    ckpt = None
    if tc.resume:
        if not os.path.exists(os.path.join(out_dir, "ckpt.pt")) and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            raise UsageError(f"{out_dir} has no checkpoint: the run stopped before its first one; "
                             "delete the directory or choose another --out_dir to start again")
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        saved = [GPTConfig(**ckpt["model_config"]), TrainConfig(**ckpt["train_config"])]
        (mc, tc), _, _ = parse_config(argv, classes, "train.py", USAGE, bases=saved)
        changed = [f"{k}: {asdict(s)[k]!r} -> {v!r}" for s, new in zip(saved, (mc, tc))
                   for k, v in asdict(new).items() if k not in RUNTIME_FIELDS and asdict(s)[k] != v]
        if changed:
            raise UsageError(f"cannot resume {out_dir} with a changed config ({'; '.join(changed)}); "
                             "start a new run with another --out_dir")
    elif os.path.exists(os.path.join(out_dir, "ckpt.pt")) or os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        raise UsageError(f"{out_dir} already holds a run; continue it with --resume, or choose "
                         "another --out_dir or --run_name")
    tc = dataclasses.replace(tc, run_name=run_name, out_dir=out_dir)
    return mc, tc, ckpt


def main(argv):
    mc, tc, ckpt = resolve_config(argv)
    d = setup_dist(tc.device)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(mc, tc, ckpt, d)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    teardown_dist()


def train(mc, tc, ckpt, d):
    plan = make_plan(mc, tc, d.world_size)
    set_tf32(tc.tf32)
    shards = find_shards(tc.data_dir, tc.dataset, "train")
    loader = TrainLoader(shards, plan.tokens_per_step, tc.batch_size, mc.block_size, plan.accum,
                         d.rank, d.world_size, tc.data_seed, mc.vocab_size)
    windows = eval_windows(find_shards(tc.data_dir, tc.dataset, "val"), mc.block_size, tc.eval_tokens)
    if ckpt is not None:
        _check_same_data(ckpt["data"], shards, plan, tc)
    loader.batch(ckpt["step"] if ckpt else 0, 0)  # token ids outside vocab_size: refused before
    read_windows(windows, mc.block_size, mc.vocab_size)  # anything is written, not mid-run

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(d.device)
    optimizer = configure_optimizer(model, tc, d.device_type)
    scaler = torch.amp.GradScaler(d.device_type, enabled=tc.dtype == "float16")
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
    run = Run(tc, d.master, start if ckpt else None)
    num_params = model.num_params()
    if d.master:
        write_json(os.path.join(tc.out_dir, "config.json"), {
            "model": asdict(mc), "train": asdict(tc), "derived": {**asdict(plan), "num_params": num_params},
            "env": environment(d.device)})
    run.log(f"{'resuming' if ckpt else 'starting'} {tc.out_dir} at step {start}: {num_params:,} parameters, "
            f"{plan.tokens_per_step:,} tokens/step = {d.world_size} ranks x {plan.accum} micro-batches x "
            f"{tc.batch_size} x {mc.block_size}, {plan.max_steps} steps")
    run.log("config: " + json.dumps({**asdict(mc), **asdict(tc)}))

    fwd_model, ddp_model = wrap_model(model, tc, d)
    ctx = autocast(d.device_type, tc.dtype)
    peak = peak_flops(d.device, tc.dtype)
    flops_per_step = model.flops_per_token() * plan.tokens_per_step

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def checkpoint(step):
        error = None
        if run.failed:  # a checkpoint past rows missing from metrics.jsonl would leave a gap on resume
            error = _append_failed(run.failed, step, saved["step"], tc)
        if d.master and error is None:
            state = {
                "format": "gpt-interventions", "version": CHECKPOINT_VERSION,
                "model_config": asdict(mc), "train_config": asdict(tc),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "tokens": step * plan.tokens_per_step,
                "data": {"dataset": tc.dataset, "tokens_per_step": plan.tokens_per_step,
                         "data_seed": tc.data_seed, "epoch": loader.epoch_of(step),
                         "shards": [[os.path.basename(p), n] for p, n in shards]},
                "rng": {"scheme": "dropout reseeded each step from (seed, step, rank)", "seed": tc.seed},
                "skipped_steps": skipped,
            }
            path = os.path.join(tc.out_dir, "ckpt.pt")
            try:
                save_checkpoint(path, state)
            except OSError as e:  # a full disk, a lost mount: atomic_write left the previous file as it was
                error = (f"cannot write checkpoint {path} at step {step} ({e.strerror or e}); " +
                         (f"the previous checkpoint, at step {saved['step']}, is intact" if saved["step"] is not None
                          else "no checkpoint was written"))
            else:
                saved["step"] = step
                if tc.keep_checkpoints:
                    keep_snapshots(tc.out_dir, path, step, tc.keep_checkpoints)
        if d.world_size > 1:  # doubles as the barrier: every rank learns whether the write failed
            failed = torch.tensor([error is not None], dtype=torch.int32, device=d.device)
            dist.all_reduce(failed)
            error = error or (failed.item() and "rank 0 could not write the checkpoint or its logs; see its error")
        if error:
            raise RunError(error)

    saved = {"step": start if ckpt else None}  # step of the checkpoint on disk
    bad_step = torch.full((), -1, dtype=torch.long, device=d.device)  # first non-finite step, on device
    skipped = ckpt.get("skipped_steps", 0) if ckpt else 0
    t_last, step_last = time.time(), start
    model.train()
    for step in range(start, plan.max_steps):
        lr = get_lr(step, tc, plan)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(tc.seed, step, d.rank))
        batches = (loader.batch(step, micro) for micro in range(plan.accum))
        loss_sum, norm = accumulate_gradients(ddp_model, model, optimizer, scaler, batches, plan.accum,
                                              ctx, d, tc.grad_clip)
        finite = torch.isfinite(loss_sum)
        if not scaler.is_enabled():  # with float16 the GradScaler itself skips overflowing steps
            finite &= torch.isfinite(norm)
        if tc.nonfinite == "skip" and not finite.item():  # opt-in: costs one sync per step
            skipped += 1  # no update; the step is still logged, evaluated and checkpointed
            run.log(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped} so far)")
        else:
            bad_step = torch.where((bad_step < 0) & ~finite, step + 1, bad_step)
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        last = done == plan.max_steps
        stopping, failed = stop["signal"] is not None, run.failed is not None
        if d.world_size > 1 and (done % tc.log_interval == 0 or last):
            flags = torch.tensor([stopping, failed], dtype=torch.int32, device=d.device)  # all ranks agree
            dist.all_reduce(flags)
            stopping, failed = bool(flags[0].item()), bool(flags[1].item())
        elif d.world_size > 1:
            stopping = failed = False
        if failed:  # rank 0 could not append to log.txt or metrics.jsonl: stop, as after a crash
            raise RunError(_append_failed(run.failed, done, saved["step"], tc) if run.failed else
                           "rank 0 could not append to its logs; see its error")
        saving = last or stopping or done % tc.checkpoint_interval == 0
        if done % tc.log_interval == 0 or saving:
            if bad_step.item() >= 0:
                _diverged(tc, int(bad_step.item()), saved["step"])
            loss_mean = loss_sum / plan.accum
            if d.world_size > 1:
                dist.all_reduce(loss_mean)
                loss_mean /= d.world_size
            now = time.time()
            dt = (now - t_last) / (done - step_last)
            t_last, step_last = now, done
            row = {"step": done, "tokens": done * plan.tokens_per_step, "loss": loss_mean.item(),
                   "lr": lr, "grad_norm": norm.item(), "clipped": bool(tc.grad_clip > 0 and norm.item() > tc.grad_clip),
                   "dt_ms": dt * 1000, "tok_per_s": plan.tokens_per_step / dt,
                   "mfu": flops_per_step / dt / (peak * d.world_size) if peak else None}
            if skipped:
                row["skipped_steps"] = skipped
            run.metrics(row)
            mfu = f"{row['mfu'] * 100:.1f}%" if peak else "n/a"
            run.log(f"step {done}/{plan.max_steps} loss {row['loss']:.6f} lr {lr:.3e} norm {row['grad_norm']:.4f}"
                    f"{' (clipped)' if row['clipped'] else ''} dt {row['dt_ms']:.0f}ms "
                    f"tok/s {row['tok_per_s']:,.0f} mfu {mfu}")
        if (tc.eval_interval and done % tc.eval_interval == 0) or last:
            val_loss, val_tokens = evaluate(fwd_model, windows, tc.eval_batch_size or tc.batch_size,
                                            d.device, tc.dtype, d.rank, d.world_size)
            run.metrics({"step": done, "tokens": done * plan.tokens_per_step, "val_loss": val_loss,
                         "val_tokens": val_tokens})
            run.log(f"step {done} val loss {val_loss:.6f} on {val_tokens:,} tokens")
        if saving:
            checkpoint(done)
        if stopping and not last:
            run.log(f"stopped by {stop['signal'] or 'a signal on another rank'} after step {done}; checkpoint "
                    f"saved. Resume with: python train.py --resume --out_dir={tc.out_dir}")
            return
    run.log(f"done: {plan.max_steps} steps, checkpoint {os.path.join(tc.out_dir, 'ckpt.pt')}")
    if tc.charts and d.master:  # last, after the checkpoint: drawing can cost the run nothing
        from charts import plot_run  # lazily: matplotlib only loads for a finished run
        run.log(f"charts: {', '.join(plot_run(tc.out_dir))}")


def _check_same_data(saved, shards, plan, tc):
    """A resumed run must go on through the same token chunks: same shards, same tokens per step."""
    found = [[os.path.basename(p), n] for p, n in shards]
    if saved["tokens_per_step"] != plan.tokens_per_step:
        raise UsageError(f"cannot resume {tc.out_dir}: it trained {saved['tokens_per_step']} tokens per step, "
                         f"these settings give {plan.tokens_per_step}; keep total_batch_size (or, with "
                         "total_batch_size=0, batch_size x ranks) as it was")
    if saved["shards"] != found:
        raise UsageError(f"cannot resume {tc.out_dir}: the train shards in {os.path.join(tc.data_dir, tc.dataset)} "
                         f"({len(found)} files, {sum(n for _, n in found)} tokens) differ from those it trained on "
                         f"({len(saved['shards'])} files, {sum(n for _, n in saved['shards'])} tokens)")


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
