"""Dropout whose masks are a function of (seed, step, the sequence's index in the step, site, element).

A step's sequences are numbered 0..S-1 in the order the loader lays them out (loader.TrainLoader:
rank by rank, micro-batch by micro-batch), so the same sequence gets the same number however the
step is split into micro-batches and ranks, and so the same masks: 1 x 8, 2 x 4 and 2 ranks x 4
are the same run up to summation order, and a resume with another micro-batch or rank count
continues the same run. Each sequence gets a key, two 32-bit words from numpy's SeedSequence of
(seed, step, index); every dropout site in the model has its own number, and each element of the
sequence's activation at that site is kept when a counter-based hash of (key, site, element
index) is at least p * 2^32. The hash is integer tensor arithmetic: the same bits on every device
and under torch.compile, no generator state (a resume needs none).

Without keys (a model called outside train.py's step: tests, notebooks) dropout is torch's own,
drawn from the global generator as nn.Dropout draws it.
"""

import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

RULE = "sequence"  # checkpoints record it; ones written before it existed drew masks per (step, rank)
M32 = 0xFFFFFFFF
MULT = 0x45D9F3B  # an odd multiplier under 2^27: products of 32-bit values stay below 2^63 in int64


def sequence_keys(seed, step, first, rows, device):
    """(rows, 2) int64 keys, two 32-bit words each, of sequences first..first+rows-1 of a step."""
    words = [np.random.SeedSequence([seed, step, first + i]).generate_state(2) for i in range(rows)]
    return torch.tensor(np.array(words, dtype=np.int64).reshape(rows, 2), device=device)


def mix32(x):
    """A bijection of [0, 2^32) with full avalanche (xorshift-multiply, two rounds), on int64 tensors."""
    x = ((x >> 16) ^ x) * MULT & M32
    x = ((x >> 16) ^ x) * MULT & M32
    return (x >> 16) ^ x


def site_number(name):
    """A dropout site's number from its module name; a mixture's expert 0 is the dense MLP's site,
    as it draws the dense MLP's weights (moe.py), so one expert is exactly the dense model."""
    return zlib.crc32(name.replace(".experts.0.", ".").encode())


def keep_mask(keys, site, index, p):
    """Which elements dropout keeps: keys (R, 2) of R rows, index (R or 1, n) each element's index
    in its sequence -> (R, n) bool."""
    a = mix32(keys[:, 0] ^ site)[:, None]  # (R, 1)
    b = mix32(keys[:, 1] ^ mix32(site ^ 0x5BD1E995))[:, None]  # (R, 1); mix32 takes Python ints too
    u = mix32((mix32((index + a) & M32) + b) & M32)  # (R, n) uniform on [0, 2^32)
    return u >= round(p * 2**32)


def keyed_dropout(x, keys, site, p):
    """x with each sequence's mask applied, scaled by 1/(1-p) as nn.Dropout scales. Either x is
    (B, ...) or (B*T, C) rows in sequence order and keys (B, 2) the sequences', or x is (R, C)
    tokens in any order and keys a pair (each token's sequence key (R, 2), the index of its first
    element in its sequence (R,)), as a mixture's experts see them (moe.py token_keys)."""
    if isinstance(keys, tuple):
        keys, first = keys
        rows = x
        index = first[:, None] + torch.arange(x.size(-1), device=x.device)  # (R, C)
    else:
        rows = x.reshape(len(keys), -1)
        index = torch.arange(rows.size(1), device=x.device)[None]  # (1, n)
    keep = keep_mask(keys, site, index, p)
    return (rows * (keep.to(x.dtype) / (1 - p))).view(x.shape)


class SequenceDropout(nn.Module):
    """nn.Dropout, keyed per sequence when the forward is given keys (GPT names its sites)."""

    def __init__(self, p):
        super().__init__()
        self.p, self.site = p, 0

    def forward(self, x, keys=None):
        if not self.training or self.p == 0:
            return x
        if keys is None:
            return F.dropout(x, self.p, True)
        return keyed_dropout(x, keys, self.site, self.p)

    def extra_repr(self):
        return f"p={self.p}, site={self.site}"
