"""What dropout keyed per sequence costs: a training forward and backward with keys (explicit
attention, hashed masks) against the same model without keys (SDPA's own dropout and torch's
generator, the path every step took before), alternated in one process so that both see the same
machine load; and with dropout 0 for reference.

    python benchmarks/keyed_dropout.py [--block_size=256] [--batch_size=8] [--repeats=5]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_interventions.dropout import sequence_keys  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = dict(n_layer=2, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                 vocab_size=args.vocab_size)
    torch.manual_seed(0)
    models = {p: GPT(GPTConfig(**shape, dropout=p)).train() for p in (0.1, 0.0)}
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    keys = sequence_keys(42, 0, 0, args.batch_size, "cpu")
    cases = {"dropout 0.1, keyed per sequence": (models[0.1], keys),
             "dropout 0.1, torch's generator (before)": (models[0.1], None),
             "dropout 0": (models[0.0], keys)}
    times = {name: [] for name in cases}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, (model, k) in cases.items():
            start = time.perf_counter()
            model(x, x, dropout_keys=k)[1].backward()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.block_size
    for name, ts in times.items():
        best = min(ts[1:])
        print(f"{name:42s} {best * 1000:8.1f} ms  {tokens / best:10,.0f} tokens/s")


if __name__ == "__main__":
    main()
