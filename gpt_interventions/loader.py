"""Reading shards for training and evaluation: batches addressed by step, fixed evaluation windows."""

import numpy as np

from gpt_interventions.errors import UsageError
from gpt_interventions.shards import check_vocab, read_tokens

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
