"""Tokenization throughput: prepare_data.py's process pool against tiktoken's own batch encoder.

    python benchmarks/bench_tokenizer.py [--num_proc=N] [--copies=K]

Both encode the same documents (the embedded C4 sample, repeated K times) with N workers:
prepare_data.encode_batch through a multiprocessing pool (what prepare_data.py runs, split keys
and numpy conversion included) and tiktoken's encode_ordinary_batch with N threads. Prints both
rates and their ratio; the goal is ours within 15% of tiktoken's (ratio >= 0.85).
"""

import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_data  # noqa: E402
from gpt_interventions import sources  # noqa: E402
from gpt_interventions.cli import field, parse_config  # noqa: E402
from gpt_interventions.errors import run_main  # noqa: E402
from gpt_interventions.tokenizer import get_tokenizer  # noqa: E402


@dataclass
class TokenizeBench:
    num_proc: int = field(0, "workers for both; 0: all cores")
    copies: int = field(4, "times the 1,000-document sample is repeated")
    rounds: int = field(3, "timed rounds of each; the best is reported")


def best_of(rounds, fn):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
    return n, min(times)


def main(argv):
    (cfg,), _, _ = parse_config(argv, [TokenizeBench], "benchmarks/bench_tokenizer.py", "[--key=value ...]")
    n = cfg.num_proc or os.cpu_count()
    with gzip.open(prepare_data.SAMPLE, "rt") as f:
        texts = [json.loads(line)["text"] for line in f] * cfg.copies
    docs = [(None, t) for t in texts]
    batches = [docs[i:i + sources.BATCH_DOCS] for i in range(0, len(docs), sources.BATCH_DOCS)]
    enc = get_tokenizer()

    with multiprocessing.Pool(n, initializer=prepare_data._init_worker) as pool:
        pool.map(prepare_data.encode_batch, batches[:n])  # warm the workers
        ours_tokens, ours = best_of(cfg.rounds, lambda: sum(t.size - l.size for t, l, _ in
                                                            pool.imap(prepare_data.encode_batch, batches)))
    ref_tokens, ref = best_of(cfg.rounds, lambda: sum(map(len, enc.encode_ordinary_batch(texts, num_threads=n))))
    assert ours_tokens == ref_tokens, (ours_tokens, ref_tokens)  # the same tokens (ours adds one EOT a doc)
    print(f"{len(texts):,} documents, {ref_tokens:,} tokens, {n} workers")
    print(f"prepare_data pool       {ours_tokens / ours:12,.0f} tokens/s")
    print(f"tiktoken batch encoder  {ref_tokens / ref:12,.0f} tokens/s")
    print(f"ratio (ours / tiktoken) {ref / ours:12.2f}")


if __name__ == "__main__":
    run_main(main)
