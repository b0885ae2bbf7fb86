"""The story's own token dataset, gpjt/fineweb-gpt2-tokens, as our shards (prepare_data.py --dataset=story).

Its two files, train.safetensors and validation.safetensors, each hold one uint16 vector named
`tokens`: FineWeb sample-10BT split 99% / 1% by document, GPT-2 BPE, every document followed by
<|endoftext|>. The story's code trained on the train tokens from the start (its micro-batch m was
tokens [m * B * T, (m + 1) * B * T + 1)) and scored its test loss on the validation tokens
[50,000,000, 50,000,000 + 19,660,801): 3,200 batches of 6 x 1,024, 19,660,800 scored tokens.

Here train holds the train tokens in order (so the loader trains each step on the tokens the
story's code trained that step on), test exactly the story's test tokens (eval.py scores their
19,200 windows of 1,024), and val the validation tokens before them, from the start.
"""

import os

import numpy as np

from gpt_interventions.errors import UsageError
from gpt_interventions.shards import ShardWriter

REPO = "gpjt/fineweb-gpt2-tokens"
FILES = {"train": "train.safetensors", "validation": "validation.safetensors"}
TEST_OFFSET = 50_000_000
TEST_TOKENS = 3200 * 6 * 1024 + 1  # its 3,200 batches of 6 x 1,024, plus the last target
VAL_TOKENS = 10 * 2**20
VOCAB = 50257
SLICE = 10_000_000  # tokens read at a time: bounded memory for the 20 GB train file


def budgets(cfg):
    """(val tokens, test offset, test tokens) from the flags; 0 means the story's."""
    return cfg.val_tokens or VAL_TOKENS, cfg.test_offset or TEST_OFFSET, cfg.test_tokens or TEST_TOKENS


class TokenFile:
    """One of the story's files: its `tokens` vector, read a slice at a time."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open
        name = os.path.basename(path)
        if not os.path.isfile(path):
            raise UsageError(f"{path} not found; the story's dataset is a directory with "
                             f"{' and '.join(FILES.values())} (from the hub: {REPO})")
        try:
            self._file = safe_open(path, "np")
            keys = list(self._file.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{path} is not a readable safetensors file ({str(e)[:120]})") from None
        if "tokens" not in keys:
            raise UsageError(f"{name} holds {', '.join(keys) or 'no tensors'}, not the vector `tokens` "
                             f"of the story's dataset ({REPO})")
        self._slice = self._file.get_slice("tokens")
        dtype, shape = self._slice.get_dtype(), self._slice.get_shape()
        if dtype != "U16" or len(shape) != 1:
            raise UsageError(f"{name}: `tokens` is {dtype} of shape {shape}, not a uint16 vector; "
                             f"it is not the story's dataset ({REPO})")
        self.path, self.size = path, int(shape[0])

    def read(self, start, stop):
        return np.asarray(self._slice[start:stop], dtype=np.uint16)


def check(files, cfg):
    """Refuse, before anything is written, files too short for the offsets and budgets."""
    val_tokens, offset, test_tokens = budgets(cfg)
    val = files["validation"]
    if val_tokens > offset:
        raise UsageError(f"--val_tokens={val_tokens} would overlap the test split, which starts at "
                         f"--test_offset={offset}; lower --val_tokens")
    if test_tokens > cfg.shard_tokens:  # eval's windows do not cross shards: one shard keeps every batch
        raise UsageError(f"--shard_tokens={cfg.shard_tokens} would split the test split of {test_tokens:,} "
                         "tokens across shards and lose the windows at the cut; raise --shard_tokens")
    if val.size < offset + test_tokens:
        raise UsageError(f"{val.path} holds {val.size:,} tokens, too few for the test split at "
                         f"[{offset:,}, {offset + test_tokens:,}); lower --test_offset or --test_tokens")
    if files["train"].size < 2:
        raise UsageError(f"{files['train'].path} holds {files['train'].size} tokens: nothing to train on")
    for name, tokens in (("val", val.read(0, val_tokens)), ("test", val.read(offset, offset + test_tokens))):
        if tokens.size and int(tokens.max()) >= VOCAB:
            raise UsageError(f"{val.path}: the {name} tokens hold id {int(tokens.max())}, outside GPT-2's "
                             f"{VOCAB}; it is not GPT-2 tokens")


def write_splits(files, cfg, staging):
    """Write train, val and test shards into `staging`; returns per-split summaries as meta.json
    holds them (documents are counted by their <|endoftext|>)."""
    val_tokens, offset, test_tokens = budgets(cfg)
    out = {}
    for split, name, start, stop in (
            ("train", "train", 0, min(files["train"].size, cfg.max_tokens or files["train"].size)),
            ("val", "validation", 0, val_tokens),
            ("test", "validation", offset, offset + test_tokens)):
        writer = ShardWriter(staging, split, cfg.shard_tokens)
        for lo in range(start, stop, SLICE):
            tokens = files[name].read(lo, min(lo + SLICE, stop))
            writer.add(tokens)
        out[split] = writer.close()
    return out


def split_rule(files, cfg):
    val_tokens, offset, test_tokens = budgets(cfg)
    train = files["train"].size
    return {"train": "train.safetensors tokens in order" + (f", the first {cfg.max_tokens}" if cfg.max_tokens
                                                            and cfg.max_tokens < train else ""),
            "val": f"validation.safetensors tokens [0, {val_tokens})",
            "test": f"validation.safetensors tokens [{offset}, {offset + test_tokens})"}
