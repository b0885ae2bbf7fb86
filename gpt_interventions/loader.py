"""Reading shards for training and evaluation: batches addressed by step, fixed evaluation windows."""

import numpy as np

from gpt_interventions.errors import UsageError
from gpt_interventions.shards import check_vocab, read_tokens

# ----------------------------------------------------------------------------------------------
# training batches


class TrainLoader:
    """Deterministic training batches addressed by optimizer step.

    The train shards, in order, are one stream of tokens. Step k trains on chunk k of it: the
    `tokens_per_step` tokens from k * tokens_per_step (+1 for the shifted targets), read across a
    shard boundary where a chunk spans one; after the last whole chunk the stream starts again
    (an epoch), and `data_seed` > 0 permutes the chunks within each epoch. Micro-batch `micro` on
    rank `rank` reads rows `(rank * accum + micro) * B ...` of the chunk, so splitting a step over
    more micro-batches or ranks never changes its tokens, and the loader's whole state is the step
    number (resume needs nothing else). The story's code read the same way: its micro-batch m was
    the stream's tokens from m * B * T, and step k's micro-batches are those of chunk k.
    """

    def __init__(self, shards, tokens_per_step, batch_size, block_size, accum, rank, world_size,
                 data_seed, vocab_size):
        self.shards, self.S = shards, tokens_per_step
        self.B, self.T, self.accum, self.rank = batch_size, block_size, accum, rank
        assert batch_size * block_size * accum * world_size == tokens_per_step
        self.data_seed, self.vocab_size = data_seed, vocab_size
        self.starts = np.cumsum([0] + [n for _, n in shards])  # stream offset of each shard, then the end
        total = int(self.starts[-1])
        self.chunks = (total - 1) // tokens_per_step if total > 0 else 0
        if self.chunks == 0:
            raise UsageError(f"one optimizer step needs {tokens_per_step + 1} tokens but the train shards "
                             f"hold {total} ({len(shards)} file(s) from {shards[0][0]}); lower total_batch_size "
                             "or block_size, or prepare more data")
        self._perm_epoch, self._perm = None, None

    def chunk(self, step):
        """Index of the chunk trained at `step` (its tokens start at chunk * tokens_per_step)."""
        epoch, i = divmod(step, self.chunks)
        if self.data_seed:
            if self._perm_epoch != epoch:
                rng = np.random.default_rng([self.data_seed, epoch])
                self._perm, self._perm_epoch = rng.permutation(self.chunks), epoch
            i = int(self._perm[i])
        return i

    def read(self, offset, count):
        """`count` tokens of the stream from `offset`, each shard's part checked against vocab_size."""
        parts = []
        s = int(np.searchsorted(self.starts, offset, side="right")) - 1
        while count > 0:
            path, n = self.shards[s]
            lo = offset - int(self.starts[s])
            part = read_tokens(path, lo, min(count, n - lo))
            check_vocab(part, self.vocab_size, path)
            parts.append(part)
            offset, count, s = offset + part.size, count - part.size, s + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, step, micro):
        """(x, y) int64 numpy arrays of shape (B, T) for this step's micro-batch on this rank."""
        start = self.chunk(step) * self.S
        row = (self.rank * self.accum + micro) * self.B
        if micro == 0:  # every rank checks the whole step (its own rows too), so under DDP all
            self.read(start, self.S + 1)  # refuse together
        buf = self.read(start + row * self.T, self.B * self.T + 1).astype(np.int64)
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
