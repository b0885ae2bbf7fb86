"""Every switch compiled and in half precision: tokens/s, peak memory, dynamo's graphs and graph
breaks, and agreement with eager, one table row per switch and precision.

    python benchmarks/switches.py --device=cuda            # in benchmarks/gpu_check.sh: about 3 minutes
    python benchmarks/switches.py --device=cpu --tiny=True --backend=eager --budget=0   # the CPU dry mode

A row is GPT-2 small's shape (12 layers x 768, block 1024, the GPT-2 vocabulary: the project's
defaults, untied, 163M parameters) with dropout 0, plus one switch; "modern.toml" is that preset
as train.py reads it (its switches, Muon, dropout 0, clipping). Dropout masks are keyed
hashes of (seed, step, sequence) (gpt_interventions/dropout.py), the same compiled or eager, so the
two runs of a row differ only in their arithmetic.

Each row trains `warmup + steps` steps on the same random tokens twice from the same initial
weights, compiled (torch.compile, train.py's --compile=True) and eager, through
gpt_interventions/step.py as train.py does: bfloat16 autocast, or float16 autocast with a
GradScaler. Columns: tokens/s and ms/step of the compiled run's timed steps; its peak memory;
dynamo's graph count and graph breaks (torch._dynamo.utils.counters); the largest |compiled loss -
eager loss| over every step; the compiled run's last loss. A row fails on an error, a non-finite
loss or a graph break; the script then exits 1 after printing the whole table.

Rows run in order of importance (the baseline and the modern stack in both precisions, then each
switch in bfloat16, then each in float16) until --budget seconds have passed; the rest are listed
as not run. --tiny=True (1 layer x 32, block 32, vocab 256) with --backend=eager (dynamo's capture
without code generation) is the CPU dry mode that tests/test_switches.py runs in CI.
"""

import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch._dynamo.utils import counters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gpt_interventions.cli import field, parse_config  # noqa: E402
from gpt_interventions.device import autocast, setup_dist  # noqa: E402
from gpt_interventions.errors import UsageError, run_main  # noqa: E402
from gpt_interventions.optimizer import configure_optimizer  # noqa: E402
from gpt_interventions.step import accumulate_gradients, wrap_model  # noqa: E402
from gpt_interventions.training import TrainConfig  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

USAGE = "[--key=value ...]"
# one switch a row, as train.py flags (or a preset) on top of the base; interventions.md describes each
SWITCHES = {
    "baseline": [],
    "modern.toml": [os.path.join(ROOT, "config", "modern.toml")],
    "position=rope": ["--position=rope"],
    "norm=rmsnorm": ["--norm=rmsnorm"],
    "qk_norm": ["--qk_norm=True"],
    "mlp=swiglu": ["--mlp=swiglu"],
    "mlp=relu2": ["--mlp=relu2"],
    "bias=False": ["--bias=False"],
    "logit_softcap=15": ["--logit_softcap=15"],
    "zero_init_proj": ["--zero_init_proj=True"],
    "z_loss=1e-4": ["--z_loss=1e-4"],
    "optimizer=muon": ["--optimizer=muon"],
    "n_expert=4 top_k=2": ["--n_expert=4", "--expert_top_k=2", "--moe_aux_loss=0.01"],
    "moe_impl=dense": ["--n_expert=4", "--expert_top_k=2", "--moe_aux_loss=0.01", "--moe_impl=dense"],
    "tie_weights": ["--tie_weights=True"],
    "qkv_bias": ["--qkv_bias=True"],
    "dropout=0.1": ["--dropout=0.1"],
    "init=gpt2": ["--init=gpt2"],
    "pad_vocab": ["--pad_vocab=True"],
    "parametrization=mup": ["--parametrization=mup"],
}
BASE = ["--dropout=0.0", "--total_batch_size=0", "--compile=True"]
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=256"]
DTYPES = ("bfloat16", "float16")


@dataclass
class SwitchCheck:
    device: str = field("cuda", "cuda, cuda:N or cpu")
    tiny: bool = field(False, "1 layer x 32 wide, block 32, vocab 256 instead of GPT-2 small: the CPU dry mode")
    backend: str = field("inductor", "torch.compile backend: inductor (train.py's) or eager (dynamo's capture "
                         "alone: the CPU dry mode)", choices=("inductor", "eager"))
    batch_size: int = field(8, "sequences per step")
    warmup: int = field(2, "untimed steps first (compilation)")
    steps: int = field(3, "timed steps after the warm-up")
    budget: float = field(150.0, "seconds after which no new row starts; 0: no limit")
    only: str = field("", "comma-separated row names to run (see SWITCHES); empty: all")


def configs(flags, sc):
    """(GPTConfig, TrainConfig) of one row, resolved as train.py resolves its command line."""
    presets = [f for f in flags if f.endswith(".toml")]
    argv = [*presets, *BASE, *(TINY if sc.tiny else []), f"--batch_size={sc.batch_size}", f"--device={sc.device}",
            *(f for f in flags if f not in presets)]
    (mc, tc), _, _ = parse_config(argv, [GPTConfig, TrainConfig], "switches", USAGE)
    return mc, tc


def batches(mc, batch_size, n):
    """n (x, y) micro-batches of uniform random token ids (numpy, as the loader gives them)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mc.vocab_size, (n, batch_size, mc.block_size + 1))
    return [(t[:, :-1].copy(), t[:, 1:].copy()) for t in tokens]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def train_steps(mc, tc, data, d, backend="inductor", after_step=None):
    """Train one step per (x, y) of `data` from tc.seed's initial weights, as train.py's loop does
    (compiled if tc.compile, autocast in tc.dtype, a GradScaler for float16, the optimizer of
    tc.optimizer at its peak lr); after_step(step, fwd_model), if given, runs after each step (a
    validation, say). Returns (losses, seconds of each step, the plain model, the scaler)."""
    torch.manual_seed(tc.seed)
    with torch.device(d.device):  # on a GPU drawn there (163M weights in ms, not a CPU's seconds): the
        model = GPT(mc)           # same weights for both runs of a row, though not train.py's CPU draws
    optimizer = configure_optimizer(model, tc, d.device_type)
    scaler = torch.amp.GradScaler(d.device_type, enabled=tc.dtype == "float16")
    fwd_model, ddp_model = wrap_model(model, tc, d)  # train.py's compile, and the dynamo settings it makes
    if tc.compile and backend != "inductor":  # the same on one process with another backend
        fwd_model = ddp_model = torch.compile(model, backend=backend)
    ctx = autocast(d.device_type, tc.dtype)
    model.train()
    losses, seconds = [], []
    for step, batch in enumerate(data):
        t0 = time.perf_counter()  # dropout is keyed by (tc.seed, step, sequence), as in train.py
        loss_sum, _ = accumulate_gradients(ddp_model, model, optimizer, scaler, [batch], 1, ctx, d, tc, step)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync(d.device)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss_sum)
        if after_step is not None:
            after_step(step, fwd_model)
    return [loss.item() for loss in losses], seconds, model, scaler


def fresh_dynamo():
    """Forget every compiled graph and zero dynamo's counters (reset() alone keeps the counters)."""
    torch._dynamo.reset()
    counters.clear()


def dynamo_counts():
    """(graphs compiled, graph breaks) since fresh_dynamo(), by dynamo's own counters."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def measure(name, dtype, sc, d):
    """One row: the compiled run (timed, counted), then the eager run on the same steps."""
    mc, tc = configs(SWITCHES[name], sc)
    tc = replace(tc, dtype=dtype)
    data = batches(mc, sc.batch_size, sc.warmup + sc.steps)
    fresh_dynamo()  # each row compiles afresh (and stays under dynamo's cache limit)
    if d.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)
    compiled, seconds, _, _ = train_steps(mc, tc, data, d, sc.backend)
    graphs, breaks = dynamo_counts()
    memory = f"{torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB" if d.device.startswith("cuda") else "n/a"
    eager, _, _, _ = train_steps(mc, replace(tc, compile=False), data, d)
    step_s = sum(seconds[sc.warmup:]) / sc.steps
    diff = max(abs(a - b) for a, b in zip(compiled, eager))
    finite = all(np.isfinite(compiled + eager))
    status = "ok" if finite and not breaks else "FAILED: " + ("non-finite loss" if not finite else "graph break")
    return [name, dtype, f"{sc.batch_size * mc.block_size / step_s:,.0f}", f"{step_s * 1000:.1f}", memory,
            str(graphs), str(breaks), f"{diff:.2e}", f"{compiled[-1]:.4f}", status]


HEADER = ["switch", "dtype", "tokens/s", "ms/step", "peak memory", "graphs", "graph breaks",
          "max |compiled - eager| loss", "last loss", "status"]


def row(cells):
    return "| " + " | ".join(cells) + " |"


def plan(only):
    """The rows in the order they run: the baseline and modern.toml in both precisions first."""
    names = [n.strip() for n in only.split(",") if n.strip()] or list(SWITCHES)
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise UsageError(f"--only: unknown row {unknown[0]!r}; rows: {', '.join(SWITCHES)}")
    first = [(n, dt) for dt in DTYPES for n in names if n in ("baseline", "modern.toml")]
    return first + [(n, dt) for dt in DTYPES for n in names if (n, dt) not in first]


def main(argv):
    (sc,), _, _ = parse_config(argv, [SwitchCheck], "benchmarks/switches.py", USAGE)
    if sc.batch_size <= 0 or sc.steps <= 0 or sc.warmup < 0 or sc.budget < 0:
        raise UsageError("--batch_size and --steps must be positive; --warmup and --budget 0 or more")
    rows = plan(sc.only)
    d = setup_dist(sc.device)
    print(f"every switch compiled ({sc.backend}) and eager on {d.device}"
          f"{' (' + torch.cuda.get_device_name(d.device) + ')' if d.device.startswith('cuda') else ''}, "
          f"torch {torch.__version__}: {sc.batch_size} sequences a step, {sc.warmup} warm-up + {sc.steps} "
          f"timed steps; rows as they finish:", flush=True)
    print(row(HEADER) + "\n" + row(["---"] * len(HEADER)), flush=True)
    t0, done = time.time(), {}
    for name, dtype in rows:
        empty = [name, dtype, *["-"] * (len(HEADER) - 3)]
        if sc.budget and time.time() - t0 > sc.budget:
            done[name, dtype] = [*empty, f"not run: the {sc.budget:g} s budget was spent"]
            continue
        try:
            done[name, dtype] = measure(name, dtype, sc, d)
        except Exception as e:  # one switch failing must not hide the others' rows
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            done[name, dtype] = [*empty, f"FAILED: {type(e).__name__}: {message[:160]}"]
        print(row(done[name, dtype]), flush=True)
    print(f"\nthe table ({time.time() - t0:.0f} s):\n" + row(HEADER) + "\n" + row(["---"] * len(HEADER)))
    for name in SWITCHES:
        for dtype in DTYPES:
            if (name, dtype) in done:
                print(row(done[name, dtype]))
    failed = [f"{n} {dt}" for (n, dt), cells in done.items() if cells[-1].startswith("FAILED")]
    if failed:
        print(f"FAILED rows: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
