"""The one function that scores a model: eval.py's test loss and train.py's validation both call it."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_interventions.device import autocast, device_type_of
from gpt_interventions.loader import read_windows


@torch.no_grad()
def evaluate(model, windows, batch_size, device, dtype="float32", rank=0, world_size=1, block_size=None):
    """Mean cross-entropy over every target token of `windows`, summed in float64.

    Each window is block_size tokens (default the model's own; a shorter one scores a long-context
    model on the windows a shorter model is scored on: eval.py --block_size).
    Windows are dealt round-robin to ranks and the sums all-reduced, so any world size scores
    exactly the same tokens. Returns (loss, tokens). The head is scored in slices (GPT.nll_sum),
    except for a compiled model on a GPU, whose compiled forward scores 1.35x faster there (at 4x
    the memory, the whole logits tensor: BENCHMARKS.md); the two agree up to float rounding.
    """
    device_type = device_type_of(device)
    compiled = model if device_type == "cuda" and hasattr(model, "_orig_mod") else None
    model = getattr(model, "_orig_mod", model)  # the plain module: its config, its train/eval mode
    block_size = block_size or model.config.block_size
    was_training = model.training
    model.eval()
    mine = windows[rank::world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    chunk = 2**27 if device_type == "cuda" else 2**19  # logits at a time: see GPT.nll_sum
    for i in range(0, len(mine), batch_size):
        x, y = read_windows(mine[i:i + batch_size], block_size, model.config.vocab_size)
        x = torch.from_numpy(x).to(device, non_blocking=True)
        y = torch.from_numpy(y).to(device, non_blocking=True)
        with autocast(device_type, dtype):
            total[0] += forward_nll_sum(compiled, x, y) if compiled is not None else model.nll_sum(x, y, chunk)
        total[1] += y.numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    loss_sum, tokens = total.tolist()
    return loss_sum / tokens, int(tokens)


def forward_nll_sum(forward, x, y):
    """Summed cross-entropy (float64) of targets y from the model's full forward logits."""
    logits, _ = forward(x)  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double().sum()
