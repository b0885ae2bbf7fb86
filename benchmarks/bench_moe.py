"""Mixture of experts, sparse against dense: step time and the experts' share of it.

    python benchmarks/bench_moe.py                                # 6 and 8 experts, top-2, on the CPU
    python benchmarks/bench_moe.py --experts=6x2,8x2,8x1 --n_embd=512
    python benchmarks/bench_moe.py --device=cuda --dtype=bfloat16 --n_layer=12 --n_embd=768 --batch_size=8 --block_size=1024

For each N x k in --experts and each moe_impl, on one model with those experts (and once without
experts, as the reference): the median time of a training step (forward and backward of
batch_size random sequences, then AdamW) and of one MoE layer's forward and backward alone on
the same tokens (batch_size x block_size rows of width n_embd), by the wall clock or, on a shared
machine, by this process's CPU time (--clock=cpu with one thread). The MLP's share of the step is
n_layer x that layer's time / the step time; sparse / dense of the layer time should fall toward
k/N (each token computes k experts instead of N). One line per row, then the table as markdown.
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gpt_interventions.cli import field, parse_config  # noqa: E402
from gpt_interventions.device import autocast  # noqa: E402
from gpt_interventions.errors import UsageError, run_main  # noqa: E402
from gpt_interventions.moe import MoE  # noqa: E402
from model import GPT, MLP, GPTConfig  # noqa: E402


@dataclass
class BenchMoE:
    experts: str = field("6x2,8x2", "comma-separated N x k: experts per layer x experts per token")
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(256, "model width")
    block_size: int = field(128, "tokens per sequence")
    vocab_size: int = field(8192, "vocabulary (small, so that the head does not hide the experts)")
    batch_size: int = field(8, "sequences per step")
    steps: int = field(3, "timed steps (the median counts)")
    warmup: int = field(1, "untimed steps first")
    device: str = field("cpu", "cpu or cuda")
    dtype: str = field("float32", "float32 or bfloat16 (autocast)", choices=("float32", "bfloat16"))
    clock: str = field("wall", "wall (elapsed time) or cpu (this process's CPU time: on a shared machine the "
                       "work done, not the wait for a core; run it with OMP_NUM_THREADS=1)", choices=("wall", "cpu"))


def parse_experts(text):
    try:
        pairs = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or not 1 <= p[1] <= p[0] for p in pairs):
        raise UsageError(f"--experts must be N x k pairs with 1 <= k <= N, such as 6x2,8x2; got {text!r}")
    return pairs


def median_time(fn, b):
    def sync():
        if b.device.startswith("cuda"):
            torch.cuda.synchronize()
    for _ in range(b.warmup):
        fn()
    times = []
    clock = time.process_time if b.clock == "cpu" else time.perf_counter
    for _ in range(b.steps):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


def measure(b, n_expert, k, impl):
    """(step seconds, one MoE layer's forward and backward seconds or None without experts)."""
    config = GPTConfig(n_layer=b.n_layer, n_head=b.n_head, n_embd=b.n_embd, block_size=b.block_size,
                       vocab_size=b.vocab_size, dropout=0.0, n_expert=n_expert, expert_top_k=k, moe_impl=impl)
    torch.manual_seed(0)
    model = GPT(config).to(b.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, b.vocab_size, (b.batch_size, b.block_size), device=b.device)
    ctx = autocast(b.device.split(":")[0], b.dtype)

    def step():
        with ctx:
            _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = median_time(step, b)
    if not n_expert:
        return step_s, None
    layer = MoE(config, MLP).to(b.device)
    x = torch.randn(b.batch_size, b.block_size, b.n_embd, device=b.device, requires_grad=True)

    def layer_step():
        with ctx:
            y, balance = layer(x)
        (y.float().square().mean() + balance).backward()
    return step_s, median_time(layer_step, b)


def main(argv):
    (b,), _, _ = parse_config(argv, [BenchMoE], "bench_moe.py", "[--key=value ...]")
    pairs = parse_experts(b.experts)
    print(f"bench_moe: {b.n_layer} layers, width {b.n_embd}, {b.n_head} heads, vocab {b.vocab_size}, "
          f"{b.batch_size} x {b.block_size} tokens a step, {b.device} {b.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {b.clock} clock, load average {os.getloadavg()[0]:.1f}")
    rows = [(0, 1, "", *measure(b, 0, 1, "sparse"))]
    print(f"no experts: step {rows[0][3] * 1e3:.0f} ms", flush=True)
    for n, k in pairs:
        for impl in ("dense", "sparse"):
            step_s, layer_s = measure(b, n, k, impl)
            rows.append((n, k, impl, step_s, layer_s))
            print(f"{n}x{k} {impl}: step {step_s * 1e3:.0f} ms, MoE layer {layer_s * 1e3:.1f} ms, "
                  f"share {b.n_layer * layer_s / step_s:.0%}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print("| model | moe_impl | ms/step | MoE layer fwd+bwd ms | MLP share of the step | sparse/dense (layer) |")
    print("|---|---|---|---|---|---|")
    dense = {}
    for n, k, impl, step_s, layer_s in rows:
        if not n:
            print(f"| no experts | | {step_s * 1e3:.0f} | | | |")
            continue
        dense.setdefault((n, k), layer_s)  # dense comes first
        ratio = f"{layer_s / dense[n, k]:.2f} (k/N = {k / n:.2f})" if impl == "sparse" else ""
        print(f"| {n} experts, top-{k} | {impl} | {step_s * 1e3:.0f} | {layer_s * 1e3:.1f} | "
              f"{b.n_layer * layer_s / step_s:.0%} | {ratio} |")

if __name__ == "__main__":
    run_main(main)
