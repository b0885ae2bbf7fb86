"""Held-out loss: the exact token-weighted mean over fixed, non-overlapping windows of a split.

`evaluate` is the one function that scores a model; train.py's periodic validation calls it too.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import autocast
from data import read_windows


@torch.no_grad()
def evaluate(model, windows, batch_size, device, dtype="float32", rank=0, world_size=1):
    """Mean cross-entropy over every target token of `windows`, summed in float64.

    Windows are dealt round-robin to ranks and the sums all-reduced, so any world size scores
    exactly the same tokens. Returns (loss, tokens).
    """
    was_training = model.training
    model.eval()
    config = getattr(model, "_orig_mod", model).config  # a compiled model wraps the original
    mine = windows[rank::world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    for i in range(0, len(mine), batch_size):
        x, y = read_windows(mine[i:i + batch_size], config.block_size, config.vocab_size)
        x = torch.from_numpy(x).to(device, non_blocking=True)
        y = torch.from_numpy(y).to(device, non_blocking=True)
        with autocast(device_type, dtype):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum")
        total[0] += loss.double()
        total[1] += y.numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    loss_sum, tokens = total.tolist()
    return loss_sum / tokens, int(tokens)

