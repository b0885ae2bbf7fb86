"""Time training steps on synthetic tokens: tokens/s, ms/step, MFU, peak memory, loader and eval.

    python bench.py config/tiny.toml                                   # the tiny CPU model
    python bench.py --dtype=bfloat16 --compile=True --batch_size=16    # GPT-2 small, 163M, on a GPU
    python bench.py --qkv_bias=True --tie_weights=True ...             # the original 124M shape
    python bench.py config/tiny.toml --profile=out/profile             # plus a torch profiler trace
    python bench.py ../shared/story/runs/1xrtx3090-moe-no-balancing    # one of the story's runs

Takes every train.py flag and preset (a TOML file or one of the story's run directories). A step is what train.py runs: step.accumulate_gradients
over the step's micro-batches from a TrainLoader (on a temporary shard of random tokens), then
the AdamW step. After `warmup` untimed steps (compilation, allocator), `steps` steps are timed.
MFU uses model.flops_per_token (6 per matmul weight + 12·L·H·Q·T) against the device's peak
dense throughput (device.PEAK_FLOPS); for a CPU or an unlisted GPU it says so instead of inventing a number.
Also reported: the loader's share of a step (reading and copying the batches alone), and eval
tokens/s (evaluation.evaluate, forward only) against training tokens/s on the same model.
"""

import os
import resource
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from gpt_interventions.cli import field, parse_config
from gpt_interventions.device import autocast, peak_flops, set_deterministic, set_tf32, setup_dist, teardown_dist
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.evaluation import evaluate
from gpt_interventions.loader import TrainLoader, eval_windows
from gpt_interventions.optimizer import configure_optimizer
from gpt_interventions.resolve import story_run_loader
from gpt_interventions.shards import write_shard
from gpt_interventions.step import accumulate_gradients, to_device, wrap_model
from gpt_interventions.training import TrainConfig, make_plan
from model import GPT, GPTConfig

USAGE = "[config/PRESET.toml | STORY_RUN_DIR ...] [--key=value ...]"


@dataclass
class BenchConfig:
    steps: int = field(10, "timed optimizer steps")
    warmup: int = field(3, "untimed steps first (compilation, allocator warm-up)")
    eval_windows: int = field(0, "windows scored for the eval rate; 0: as many tokens as the timed steps train on")
    profile: str = field("", "write a torch profiler trace (Chrome JSON) of 2 steps to this directory")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, n, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def peak_memory(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on the GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process peak)"


def main(argv):
    (mc, tc, bc), _, _ = parse_config(argv, [GPTConfig, TrainConfig, BenchConfig], "bench.py", USAGE,
                                      load_dir=story_run_loader(argv))
    if bc.steps <= 0 or bc.warmup < 0 or bc.eval_windows < 0:
        raise UsageError("--steps must be positive; --warmup and --eval_windows 0 or more")
    if bc.profile and os.path.exists(bc.profile) and not os.path.isdir(bc.profile):
        raise UsageError(f"--profile={bc.profile} is a file; give a directory")
    d = setup_dist(tc.device)
    with tempfile.TemporaryDirectory() as tmp:
        bench(mc, replace(tc, max_iters=bc.warmup + bc.steps, max_tokens=0), bc, d, tmp)
    teardown_dist()


def bench(mc, tc, bc, d, tmp):
    plan = make_plan(mc, tc, d.world_size)
    set_tf32(tc.tf32)
    set_deterministic(tc.deterministic, d.device_type, tc.compile)
    # random tokens: a chunk per step, so the timed steps read the shard as a run would
    n = plan.tokens_per_step * (bc.warmup + bc.steps + 3) + 1
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, n, dtype=np.int64).astype(np.uint16)
    write_shard(os.path.join(tmp, "train_000000.bin"), tokens)
    shards = [(os.path.join(tmp, "train_000000.bin"), n)]
    loader = TrainLoader(shards, plan.tokens_per_step, tc.batch_size, mc.block_size, plan.accum,
                         d.rank, d.world_size, 0, mc.vocab_size)

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(d.device)
    optimizer = configure_optimizer(model, tc, d.device_type)
    scaler = torch.amp.GradScaler(d.device_type, enabled=tc.dtype == "float16")
    fwd_model, ddp_model = wrap_model(model, tc, d)
    ctx = autocast(d.device_type, tc.dtype)
    model.train()
    state = {"step": 0}

    def step():
        batches = (loader.batch(state["step"], micro) for micro in range(plan.accum))
        accumulate_gradients(ddp_model, model, optimizer, scaler, batches, plan.accum, ctx, d, tc, state["step"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    for _ in range(bc.warmup):
        step()
    if d.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(d.device)
    cpu_start = time.process_time()
    dt = timed(step, bc.steps, d.device)
    cpu_time = (time.process_time() - cpu_start) / bc.steps  # every thread's: steadier than dt under load
    memory = peak_memory(d.device)
    if d.device_type == "cpu":
        memory += f"; freed memory kept for reuse: {'yes' if d.kept_freed_memory else 'no (glibc absent or refused)'}"
    load = timed(lambda: [to_device(loader.batch(0, m), d.device) for m in range(plan.accum)], bc.steps, d.device)

    eval_batch = tc.eval_batch_size or tc.batch_size
    # eval's rate is a mean over as much work as training's: the timed steps' tokens, by default
    n_windows = bc.eval_windows or bc.steps * plan.tokens_per_step // mc.block_size
    windows = eval_windows(shards, mc.block_size)[:n_windows]
    # ranks share the windows and all-reduce, so the rate below is global, as training's is
    evaluate(fwd_model, windows[:eval_batch * d.world_size], eval_batch, d.device, tc.dtype, d.rank,
             d.world_size)  # warm-up
    eval_dt = timed(lambda: evaluate(fwd_model, windows, eval_batch, d.device, tc.dtype, d.rank, d.world_size),
                    1, d.device)
    eval_rate = len(windows) * mc.block_size / eval_dt

    if bc.profile and d.master:
        os.makedirs(bc.profile, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if d.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(2):
                step()
            sync(d.device)
        trace = os.path.join(bc.profile, "trace.json")
        prof.export_chrome_trace(trace)

    rate = plan.tokens_per_step / dt
    peak = peak_flops(d.device, tc.dtype)
    mfu = (f"{model.flops_per_token() * rate / (peak * d.world_size) * 100:.1f}% of {peak / 1e12:.0f} TFLOP/s"
           if peak else f"n/a (no known peak throughput for {d.device})")
    if d.master:
        print(f"model       {model.num_params():,} parameters, {mc.n_layer} layers x {mc.n_embd} wide, "
              f"block {mc.block_size}, vocab {mc.vocab_size}")
        print(f"step        {plan.tokens_per_step:,} tokens = {d.world_size} ranks x {plan.accum} x "
              f"{tc.batch_size} x {mc.block_size}; {tc.dtype}, compile={tc.compile}, device {d.device}, "
              f"{torch.get_num_threads()} threads; {bc.steps} steps after {bc.warmup} warm-up")
        print(f"tokens/s    {rate:,.0f}")
        print(f"ms/step     {dt * 1000:.1f}")
        print(f"cpu         {cpu_time * 1000:.1f} ms of CPU time per step (all threads of this process)"
              + (f"; denormals flushed to zero: {'yes' if d.flushed_denormals else 'no'}" if d.device_type == "cpu"
                 else ""))
        print(f"mfu         {mfu}")
        print(f"memory      {memory}")
        print(f"loader      {load * 1000:.2f} ms/step = {load / dt * 100:.2f}% of a step")
        print(f"eval        {eval_rate:,.0f} tokens/s = {eval_rate / rate:.2f}x training "
              f"({len(windows)} windows, batch {eval_batch})")
        if bc.profile:
            print(f"profile     {os.path.join(bc.profile, 'trace.json')}")


if __name__ == "__main__":
    run_main(main)
