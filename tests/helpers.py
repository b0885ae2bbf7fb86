"""Shared test fixtures: small learnable token shards and tiny training flags."""

import json
import os
import subprocess
import sys

import numpy as np
import torch

from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.errors import run_main
from gpt_interventions.shards import write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256


def synthetic_tokens(n, vocab=VOCAB, seed=0):
    """A learnable stream: an arithmetic pattern with a little noise, all ids < vocab."""
    rng = np.random.default_rng(seed)
    return ((np.arange(n) * 7 + rng.integers(0, 3, n)) % vocab).astype(np.uint16)


def make_shards(data_dir, dataset="syn", train=(40_000,), val=8_000, test=8_000, vocab=VOCAB):
    """Write train shards of the given sizes plus one val and one test shard; return data_dir."""
    os.makedirs(os.path.join(data_dir, dataset), exist_ok=True)
    for i, n in enumerate(train):
        write_shard(os.path.join(data_dir, dataset, f"train_{i:06d}.bin"), synthetic_tokens(n, vocab, seed=i))
    write_shard(os.path.join(data_dir, dataset, "val_000000.bin"), synthetic_tokens(val, vocab, seed=100))
    write_shard(os.path.join(data_dir, dataset, "test_000000.bin"), synthetic_tokens(test, vocab, seed=200))
    return str(data_dir)


def replicates(root, prefix, mean, spread, first_seed=42, **config):
    """Three fake runs of one configuration: test losses mean - spread, mean, mean + spread."""
    for i, eps in enumerate((-spread, 0.0, spread)):
        fake_run(root, f"{prefix}-s{i}", mean + eps, seed=first_seed + i, **config)


def tiny_flags(data_dir, out_dir, **overrides):
    """Flags for a tiny CPU run (about 30k parameters) on shards from make_shards."""
    flags = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB, dropout=0.0,
                 dataset="syn", data_dir=data_dir, out_dir=out_dir, batch_size=4,
                 total_batch_size=256, max_iters=12, max_tokens=0, dtype="float32",
                 compile=False, device="cpu", log_interval=1, eval_interval=6, eval_tokens=1024,
                 checkpoint_interval=100, learning_rate=3e-3)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(out_dir, keys=("step", "tokens", "loss", "lr", "grad_norm", "clipped")):
    """The run's logged values without timings, for exact comparisons between runs."""
    return [{k: r[k] for k in keys if k in r} for r in read_metrics(out_dir) if "loss" in r]


def tiny_run(data_dir, out_dir, **overrides):
    """A 2-step tiny run of train.py; returns its checkpoint path."""
    import train
    train.main(tiny_flags(data_dir, str(out_dir), **{"max_iters": 2, "total_batch_size": 128, **overrides}))
    return os.path.join(str(out_dir), "ckpt.pt")


def tiny_hf(path, vocab=VOCAB, tie=True, seed=0):
    """A tiny transformers GPT-2 saved with save_pretrained; every weight random (biases too)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                    tie_word_embeddings=tie))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(str(path))
    return hf.eval()


def fake_run(root, name, test_loss=None, rows=(), world_size=1, hellaswag=None, steps=None, **config):
    """A run directory as train.py and eval.py leave it, with made-up numbers (compare/sweep tests).

    config overrides train.py's defaults; rows are metrics.jsonl rows; steps: the planned steps
    (default: the last row's, else 10); test_loss and hellaswag (an acc_norm, as eval.py
    --task=hellaswag records it) go to eval.json as float32 scores of the final checkpoint.
    """
    import dataclasses

    from gpt_interventions import eval_results
    from gpt_interventions.training import TrainConfig
    from model import GPTConfig
    mc = {f.name: config.pop(f.name, f.default) for f in dataclasses.fields(GPTConfig)}
    tc = {f.name: config.pop(f.name, f.default) for f in dataclasses.fields(TrainConfig)}
    assert not config, f"unknown fields {config}"
    out = os.path.join(str(root), name)
    os.makedirs(out)
    tc.update(run_name=name, out_dir=out)
    steps = steps or max((r["step"] for r in rows), default=10)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model": mc, "train": tc, "derived": {"max_steps": steps}, "env": {"world_size": world_size}}, f)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    at = {"checkpoint": os.path.join(out, "ckpt.pt"), "step": steps, "dtype": "float32"}
    if test_loss is not None:
        eval_results.record(out, {**at, "dataset": tc["dataset"], "split": "test", "eval_tokens": 0,
                                  "loss": test_loss, "tokens": 1024})
    if hellaswag is not None:
        eval_results.record(out, {**at, "task": "hellaswag", "split": "val", "acc_norm": hellaswag,
                                  "examples": 10042})
    return out


def eval_rows(run_dir, scored="syn/test"):
    """eval.json's rows of one dataset/split (or task/split)."""
    from gpt_interventions import eval_results
    return [r for r in eval_results.read(str(run_dir)) if eval_results.scored(r) == scored]


def snapshot(root):
    """Every file under root with its bytes: to show that nothing was written or overwritten."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


def cli(main, argv, capsys):
    """(exit status, stderr) of a script's main called as its command line would."""
    capsys.readouterr()
    try:
        run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# warmup, a cosine schedule, clipping and dropout: every piece of state must resume exactly
EXACT = dict(max_iters=12, dropout=0.1, lr_schedule="cosine", warmup_iters=3, grad_clip=1.0, checkpoint_interval=4)


def ckpt_of(out):
    return load_checkpoint(os.path.join(str(out), "ckpt.pt"))


def assert_same_run(ref, out):
    """Bitwise: the logged curve, validation losses, weights and optimizer state."""
    assert curve(out) == curve(ref)
    assert [r for r in read_metrics(out) if "val_loss" in r] == [r for r in read_metrics(ref) if "val_loss" in r]
    a, b = ckpt_of(ref), ckpt_of(out)
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][i][name]), (i, name)


def torchrun(script, args, launcher=("--standalone", "--nproc_per_node=2"), **env):
    """Run script under torchrun (by default 2 CPU processes, gloo); the CompletedProcess, output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, script, *args], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=300)


def stop_after(monkeypatch, step):
    """SIGTERM while step `step` (0-indexed) runs, in this process."""
    import signal

    from gpt_interventions import loader
    batch = loader.TrainLoader.batch

    def preempt(self, s, micro):
        if s == step and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, s, micro)
    monkeypatch.setattr(loader.TrainLoader, "batch", preempt)
