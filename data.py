"""Token shards, the tokenizer, and the deterministic readers used by train and eval.

Shard format (llm.c / modded-nanogpt FineWeb shards): a header of 256 int32 (magic 20240520,
version 1, token count, zeros) followed by `count` uint16 token ids. Files are
`data/<dataset>/{train,val,test}_NNNNNN.bin`.
"""

import glob
import hashlib
import json
import os

import numpy as np

from common import ROOT, UsageError, atomic_write

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # GPT-2 <|endoftext|>, placed before every document
TIKTOKEN_CACHE = os.path.join(ROOT, "assets", "tiktoken_cache")


# ----------------------------------------------------------------------------------------------
# tokenizer


def get_tokenizer():
    """GPT-2 BPE through tiktoken, loaded from the files the project ships.

    They are the exact files tiktoken downloads, named as its cache names them; tiktoken checks
    their sha256, so an online and an offline machine produce identical tokens.
    """
    import tiktoken
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = TIKTOKEN_CACHE
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


# ----------------------------------------------------------------------------------------------
# shard files


def write_shard(path, tokens):
    """Write uint16 tokens with the header, atomically (temp file, then rename)."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())

    atomic_write(path, write)


def read_header(path):
    """Check a shard's header and size; return its token count. UsageError naming the file."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise UsageError(f"cannot read shard {path}: {e.strerror}") from None
    if header.size < HEADER_INTS:
        raise UsageError(f"shard {path} is too short for its 1024-byte header ({size} bytes)")
    if header[0] != MAGIC:
        raise UsageError(f"shard {path} has magic {header[0]}, expected {MAGIC}: "
                         "not a token shard; re-run prepare_data.py")
    if header[1] != VERSION:
        raise UsageError(f"shard {path} has version {header[1]}, expected {VERSION}")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise UsageError(f"shard {path} holds {size - HEADER_BYTES} token bytes but its header "
                         f"says {count} tokens: truncated or corrupted; re-run prepare_data.py")
    return count


def read_tokens(path, offset, count):
    """`count` uint16 tokens starting at token `offset` (no memmap: resident memory stays flat)."""
    return np.fromfile(path, dtype=np.uint16, count=count, offset=HEADER_BYTES + 2 * offset)


def read_shard(path):
    return read_tokens(path, 0, read_header(path))


def find_shards(data_dir, dataset, split):
    """The split's (path, token count) in order, each header checked; UsageError if there are none.

    Where prepare_data.py wrote a meta.json, the files must be exactly those it lists with their
    token counts, and the val and test shards (small, and what every result rests on) must have
    its sha256. Shards from elsewhere (llm.c, modded-nanogpt) come without one and are read as is.
    """
    root = os.path.join(data_dir, dataset)
    paths = sorted(glob.glob(os.path.join(root, f"{split}_[0-9]*.bin")))
    meta_path = os.path.join(root, "meta.json")
    if not os.path.exists(meta_path) and os.path.isdir(os.path.join(root, ".staging")):
        raise UsageError(f"{root} is half-prepared (prepare_data.py was stopped while moving shards); "
                         f"re-run python prepare_data.py --dataset={dataset} with the same options")
    if not paths:
        raise UsageError(f"no {split} shards in {root}; prepare them "
                         f"with: python prepare_data.py --dataset={dataset}")
    shards = [(p, read_header(p)) for p in paths]
    if os.path.exists(meta_path):
        _check_meta(meta_path, split, shards)
    return shards


def _check_meta(meta_path, split, shards):
    try:
        with open(meta_path) as f:
            listed = json.load(f)["splits"][split]["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{meta_path} is unreadable or has no {split} split; re-run prepare_data.py") from None
    found = [(os.path.basename(p), n) for p, n in shards]
    if found != [(s["file"], s["tokens"]) for s in listed]:
        raise UsageError(f"the {split} shards in {os.path.dirname(meta_path)} differ from those meta.json "
                         "lists (files added, removed or replaced); re-run prepare_data.py")
    if split != "train":
        for (path, _), s in zip(shards, listed):
            if sha256_file(path) != s["sha256"]:
                raise UsageError(f"shard {path} does not match the sha256 in meta.json: it changed "
                                 "after it was prepared; re-run prepare_data.py")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_vocab(tokens, vocab_size, path):
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise UsageError(f"shard {path} holds token id {int(tokens.max())}, outside the model's "
                         f"vocab_size {vocab_size}; the data was made with another tokenizer")


# ----------------------------------------------------------------------------------------------
# training batches


class TrainLoader:
    """Deterministic training batches addressed by optimizer step.

    Each step trains on one contiguous chunk of `tokens_per_step` (+1 for the shifted targets)
    tokens. Chunks run in order through the shards (a shard's tail shorter than a chunk is
    skipped) and wrap around per epoch; `data_seed` > 0 permutes chunks within each epoch.
    Micro-batch `micro` on rank `rank` reads rows `(rank * accum + micro) * B ...` of the chunk,
    so splitting a step over more micro-batches or ranks never changes its tokens, and the
    loader's whole state is the step number (resume needs nothing else).
    """

    def __init__(self, shards, tokens_per_step, batch_size, block_size, accum, rank, world_size,
                 data_seed, vocab_size):
        self.shards, self.S = shards, tokens_per_step
        self.B, self.T, self.accum, self.rank = batch_size, block_size, accum, rank
        assert batch_size * block_size * accum * world_size == tokens_per_step
        self.data_seed, self.vocab_size = data_seed, vocab_size
        self.per_shard = [(n - 1) // tokens_per_step if n > 0 else 0 for _, n in shards]
        self.chunks = sum(self.per_shard)
        if self.chunks == 0:
            path, biggest = max(shards, key=lambda s: s[1])
            raise UsageError(f"one optimizer step needs {tokens_per_step + 1} tokens in a shard but "
                             f"the largest train shard holds {biggest} ({path}); lower total_batch_size "
                             "or block_size, or prepare more data")
        self._perm_epoch, self._perm = None, None

    def locate(self, step):
        """(epoch, shard index, chunk index within shard) of the chunk trained at `step`."""
        epoch, i = divmod(step, self.chunks)
        if self.data_seed:
            if self._perm_epoch != epoch:
                rng = np.random.default_rng([self.data_seed, epoch])
                self._perm, self._perm_epoch = rng.permutation(self.chunks), epoch
            i = int(self._perm[i])
        for s, c in enumerate(self.per_shard):
            if i < c:
                return epoch, s, i
            i -= c
        raise AssertionError("unreachable")

    def batch(self, step, micro):
        """(x, y) int64 numpy arrays of shape (B, T) for this step's micro-batch on this rank."""
        _, s, c = self.locate(step)
        path = self.shards[s][0]
        row = (self.rank * self.accum + micro) * self.B
        buf = read_tokens(path, c * self.S + row * self.T, self.B * self.T + 1)
        if micro == 0:  # every rank checks the whole step (its own rows too), so under DDP all
            check_vocab(read_tokens(path, c * self.S, self.S + 1), self.vocab_size, path)  # refuse together
        else:
            check_vocab(buf, self.vocab_size, path)
        buf = buf.astype(np.int64)
        return buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)

    def epoch_of(self, step):
        return step // self.chunks


# ----------------------------------------------------------------------------------------------
# evaluation windows


def eval_windows(shards, block_size, max_tokens=0):
    """Non-overlapping windows (path, offset) of block_size+1 tokens, in order through the shards.

    `max_tokens` > 0 caps the number of scored tokens at max_tokens // block_size windows: a
    fixed token budget, so every model and every run is scored on exactly the same tokens.
    """
    windows = []
    for path, n in shards:
        windows += [(path, i * block_size) for i in range((n - 1) // block_size)]
    if max_tokens > 0:
        windows = windows[: max_tokens // block_size]
    if max_tokens > 0 and max_tokens < block_size:
        raise UsageError(f"an evaluation budget of {max_tokens} tokens is less than one block of {block_size}")
    if not windows:  # every shard is shorter than one window
        names = ", ".join(f"{p} ({n} tokens)" for p, n in shards)
        raise UsageError(f"the split {names} is shorter than one block of {block_size + 1} tokens")
    return windows


def read_windows(windows, block_size, vocab_size):
    """Stack windows into (x, y) int64 arrays of shape (len(windows), block_size)."""
    rows = []
    for path, offset in windows:
        buf = read_tokens(path, offset, block_size + 1)
        check_vocab(buf, vocab_size, path)
        rows.append(buf)
    arr = np.stack(rows).astype(np.int64)
    return np.ascontiguousarray(arr[:, :-1]), np.ascontiguousarray(arr[:, 1:])
