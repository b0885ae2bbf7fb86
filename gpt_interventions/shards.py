"""Token shards: the file format, and finding and checking a split's files.

Shard format (llm.c / modded-nanogpt FineWeb shards): a header of 256 int32 (magic 20240520,
version 1, token count, zeros) followed by `count` uint16 token ids. Files are
`data/<dataset>/{train,val,test}_NNNNNN.bin`, with the meta.json prepare_data.py writes.
"""

import glob
import hashlib
import json
import os

import numpy as np

from gpt_interventions.atomic import atomic_write
from gpt_interventions.errors import UsageError
from gpt_interventions.tokenizer import EOT

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 token count


def write_shard(path, tokens):
    """Write uint16 tokens with the header, atomically (temp file, then rename)."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens (int32 header), got {tokens.size}")
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
        hint = " --max_tokens=3.27e9" if dataset == "story" else ""  # its 33,165 steps, not all 20 GB
        raise UsageError(f"no {split} shards in {root}; prepare them "
                         f"with: python prepare_data.py --dataset={dataset}{hint}")
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


class ShardWriter:
    """Appends tokens and writes `{split}_NNNNNN.bin` files of exactly shard_tokens (the last shorter).

    Its documents are the <|endoftext|> tokens written (one per document, before or after it, a cut
    one included), so meta.json's counts are always those of the shards.
    """

    def __init__(self, out_dir, split, shard_tokens):
        assert 0 < shard_tokens <= MAX_SHARD_TOKENS
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf, self.buffered, self.shards, self.tokens, self.docs = [], 0, [], 0, 0

    def add(self, tokens):
        self.buf.append(tokens)
        self.buffered += tokens.size
        self.tokens += tokens.size
        self.docs += int(np.count_nonzero(tokens == EOT))
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n):
        data = np.concatenate(self.buf)
        self.buf, self.buffered = [data[n:]], data.size - n
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(os.path.join(self.out_dir, name), data[:n])
        self.shards.append({"file": name, "tokens": int(n), "sha256": sha256_file(os.path.join(self.out_dir, name))})

    def close(self):
        if self.buffered or not self.shards:
            self._flush(self.buffered)
        return {"documents": self.docs, "tokens": self.tokens, "shards": self.shards}
