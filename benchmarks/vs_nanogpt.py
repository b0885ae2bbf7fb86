"""Training throughput on the CPU, side by side with nanoGPT's train.py on the same work.

    python benchmarks/vs_nanogpt.py /path/to/nanoGPT [--iters=N] [--warmup=K] [--modes=...]

The project never vendors nanoGPT: pass a checkout of github.com/karpathy/nanoGPT. Both trainers
run as subprocesses of the same interpreter with the same environment (threads included) on the
same synthetic token stream (uniform random ids, written once in each project's format: nanoGPT's
raw uint16 train.bin/val.bin plus a meta.pkl that sets its vocab_size, and our headed shards),
with the same model and step:

- GPT-2 block, n_layer/n_head/n_embd/block_size as flagged, dropout 0, the same vocab_size in
  both (nanoGPT reads it from meta.pkl; without one it would pad to 50304);
- nanoGPT's bias=True (every Linear and LayerNorm, output head tied to the embedding) is our
  --qkv_bias=True --tie_weights=True; our other Linears and LayerNorms always carry a bias;
- AdamW lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on matrices only, constant lr,
  gradient clipping at 1.0 (nanoGPT's default);
- batch_size x block_size x accum tokens per step; no evaluation or checkpoint inside the timed
  steps (nanoGPT evaluates once at iter 0, ours once after the last step).

Each mode is a dtype and compile setting applied to both: fp32 (float32, eager), bf16 (bfloat16
autocast, eager), and the same with +compile. nanoGPT's train.py never autocasts on the CPU
(`ctx = nullcontext() if device_type == 'cpu'`), so its bf16 modes run in float32. Per run, the
first `warmup` steps (compilation, allocator warm-up) are dropped and the median step time of the
rest (or, with --stat=min, the fastest) is converted to tokens/s; with --repeats > 1 the runs alternate and the median run counts.
"equal" is fp32 eager for both; "best" is each trainer's fastest mode among those run.
On the CPU ours keeps freed memory in glibc's heap (device.keep_freed_memory), which nanoGPT
does not; --nano_malloc=True gives nanoGPT the same setting through the environment, so the
table shows the gap that is not the allocator.
"""

import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gpt_interventions.cli import field, parse_config  # noqa: E402
from gpt_interventions.errors import UsageError, run_main  # noqa: E402
from gpt_interventions.shards import write_shard  # noqa: E402

USAGE = "/path/to/nanoGPT [--key=value ...]"
MODES = {"fp32": ("float32", False), "bf16": ("bfloat16", False),
         "fp32+compile": ("float32", True), "bf16+compile": ("bfloat16", True)}
NANO_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)


@dataclass
class VsNanoGPT:
    iters: int = field(20, "timed steps per run")
    warmup: int = field(5, "steps dropped before timing (compilation happens in them)")
    modes: str = field("fp32,bf16,fp32+compile,bf16+compile", "comma-separated modes to run: "
                       + ", ".join(MODES))
    repeats: int = field(1, "runs of each trainer per mode, alternating; the median run counts")
    stat: str = field("median", "step time of a run: median, or min (steadier on a loaded machine)",
                      choices=("median", "min"))
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(128, "model width")
    block_size: int = field(128, "sequence length")
    vocab_size: int = field(50257, "vocabulary of both models (GPT-2's by default)")
    batch_size: int = field(8, "micro-batch in sequences")
    accum: int = field(2, "micro-batches per step")
    threads: int = field(0, "OMP_NUM_THREADS for both; 0: leave the environment as it is")
    nano_malloc: bool = field(False, "give nanoGPT our CPU allocator setting too (glibc's MALLOC_MMAP_THRESHOLD_ "
                              "and MALLOC_TRIM_THRESHOLD_, see device.keep_freed_memory), to see the gap "
                              "that remains without it")
    timeout: int = field(600, "seconds allowed for one run")
    keep: bool = field(False, "keep the work directory (data, logs, run directories) and print its path")


def make_data(work, cfg, tokens_per_step):
    """The same random token stream for both: nanoGPT's raw uint16 files and our shards."""
    n_train = max(1_000_000, (cfg.warmup + cfg.iters + 1) * tokens_per_step + 1)
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, n_train, dtype=np.uint16)
    val = rng.integers(0, cfg.vocab_size, 16 * cfg.block_size + 1, dtype=np.uint16)
    nano = os.path.join(work, "nanogpt_data")
    os.makedirs(nano)
    train.tofile(os.path.join(nano, "train.bin"))
    val.tofile(os.path.join(nano, "val.bin"))
    with open(os.path.join(nano, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": cfg.vocab_size}, f)
    ours = os.path.join(work, "ours_data", "bench")
    os.makedirs(ours)
    for split, tokens in (("train", train), ("val", val), ("test", val)):
        write_shard(os.path.join(ours, f"{split}_000000.bin"), tokens)
    return nano, os.path.dirname(ours)


def nanogpt_cmd(cfg, dtype, compile, data, out):
    # nanoGPT reads configurator.py from its working directory and data from
    # os.path.join('data', dataset): an absolute dataset path points it at our files.
    flags = dict(device="cpu", dtype=dtype, compile=compile, dataset=data, out_dir=out,
                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                 bias=True, dropout=0.0, batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.accum,
                 max_iters=cfg.warmup + cfg.iters - 1,  # it runs iters 0..max_iters
                 learning_rate=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                 decay_lr=False, eval_interval=10**9, eval_iters=1, log_interval=1,
                 always_save_checkpoint=False, wandb_log=False)
    return [sys.executable, "train.py"] + [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
                                           for k, v in flags.items()]


def ours_cmd(cfg, dtype, compile, data, out):
    flags = dict(device="cpu", dtype=dtype, compile=compile, dataset="bench", data_dir=data, out_dir=out,
                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                 vocab_size=cfg.vocab_size, qkv_bias=True, tie_weights=True, dropout=0.0,
                 batch_size=cfg.batch_size, total_batch_size=cfg.batch_size * cfg.block_size * cfg.accum,
                 max_iters=cfg.warmup + cfg.iters, max_tokens=0,
                 learning_rate=6e-4, weight_decay=0.1, decay_params="matrices", beta1=0.9, beta2=0.95,
                 grad_clip=1.0, log_interval=1, eval_interval=0, eval_tokens=cfg.block_size,
                 checkpoint_interval=10**9, charts=False)
    return [sys.executable, os.path.join(ROOT, "train.py")] + [f"--{k}={v}" for k, v in flags.items()]


def run(cmd, cwd, env, timeout):
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise UsageError(f"exit status {p.returncode} from {' '.join(cmd)} in {cwd}:\n{tail}")
    return p.stdout


def step_ms(side, cfg, dtype, compile, work, nano_dir, data, env, tag):
    """Median (or min) step time in ms of one run, warm-up steps dropped."""
    out = os.path.join(work, f"out_{side}_{tag}")
    if side == "nanogpt":
        if cfg.nano_malloc:
            env = dict(env, MALLOC_MMAP_THRESHOLD_=str(2**31 - 1), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
        stdout = run(nanogpt_cmd(cfg, dtype, compile, data, out), nano_dir, env, cfg.timeout)
        ms = [float(t) for _, _, t in NANO_ITER.findall(stdout)]
    else:
        run(ours_cmd(cfg, dtype, compile, data, out), work, env, cfg.timeout)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            ms = [r["dt_ms"] for r in map(json.loads, f) if "dt_ms" in r]
    if len(ms) != cfg.warmup + cfg.iters:
        raise UsageError(f"{side} logged {len(ms)} steps, expected {cfg.warmup + cfg.iters}")
    return (min if cfg.stat == "min" else statistics.median)(ms[cfg.warmup:])


def main(argv):
    (cfg,), positionals, _ = parse_config(argv, [VsNanoGPT], "benchmarks/vs_nanogpt.py", USAGE,
                                          max_positionals=1)
    if not positionals:
        raise UsageError(f"give the path of a nanoGPT checkout; usage: benchmarks/vs_nanogpt.py {USAGE}")
    nano_dir = os.path.abspath(positionals[0])
    if not all(os.path.isfile(os.path.join(nano_dir, f)) for f in ("train.py", "model.py", "configurator.py")):
        raise UsageError(f"{nano_dir} is not a nanoGPT checkout (train.py, model.py, configurator.py)")
    modes = [m.strip() for m in cfg.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise UsageError(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {cfg.modes!r}")
    if min(cfg.iters, cfg.repeats, cfg.n_layer, cfg.batch_size, cfg.accum) < 1 or cfg.warmup < 1:
        raise UsageError("--iters, --warmup, --repeats, --n_layer, --batch_size and --accum must be at least 1")
    tokens = cfg.batch_size * cfg.block_size * cfg.accum
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)

    work = tempfile.mkdtemp(prefix="vs_nanogpt_")
    try:
        report(cfg, work, nano_dir, env, modes, tokens)
    finally:
        if cfg.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(cfg, work, nano_dir, env, modes, tokens):
    """Run every mode for both trainers and print the table."""
    nano_data, ours_data = make_data(work, cfg, tokens)
    print(f"{cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd} wide, block {cfg.block_size}, "
          f"vocab {cfg.vocab_size}; {tokens:,} tokens/step = {cfg.accum} x {cfg.batch_size} x "
          f"{cfg.block_size}; {cfg.stat} of {cfg.iters} steps after {cfg.warmup} warm-up; "
          f"threads {env.get('OMP_NUM_THREADS', 'default')}; nanoGPT with our allocator setting: "
          f"{cfg.nano_malloc}", flush=True)
    times = {(side, m): [] for m in modes for side in ("nanogpt", "ours")}
    for r in range(cfg.repeats):
        for m in modes:
            for side in ("nanogpt", "ours"):
                t0 = time.time()
                data = nano_data if side == "nanogpt" else ours_data
                ms = step_ms(side, cfg, *MODES[m], work, nano_dir, data, env, f"{m}_{r}")
                times[side, m].append(ms)
                print(f"  {side:8s} {m:13s} run {r + 1}: {ms:8.1f} ms/step  ({time.time() - t0:.0f}s)", flush=True)

    def tok_s(side, m):
        return tokens / (statistics.median(times[side, m]) / 1000)

    rows = [(m, tok_s("nanogpt", m), tok_s("ours", m)) for m in modes]
    if "fp32" in modes:
        rows.append(("equal (fp32, eager)", tok_s("nanogpt", "fp32"), tok_s("ours", "fp32")))
    best_nano = max(rows[:len(modes)], key=lambda r: r[1])
    best_ours = max(rows[:len(modes)], key=lambda r: r[2])
    rows.append((f"best ({best_nano[0]} vs {best_ours[0]})", best_nano[1], best_ours[2]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mode':{width}s} {'nanoGPT tok/s':>14s} {'ours tok/s':>12s} {'ours/nanoGPT':>13s}")
    for m, n, o in rows:
        print(f"{m:{width}s} {n:14,.0f} {o:12,.0f} {o / n:13.2f}")


if __name__ == "__main__":
    run_main(main)
