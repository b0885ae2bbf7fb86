"""One training step's model work, shared by train.py and bench.py so that the benchmark times
exactly what a run computes: compile and DDP wrapping, batches to the device, forward and backward
over the micro-batches with each sequence's dropout keys, unscaling and clipping."""

from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt_interventions.dropout import sequence_keys


def wrap_model(model, tc, d):
    """(compiled model, its DDP wrapper or itself): compile first, then DDP; `model` stays the
    plain module that checkpoints save."""
    if tc.compile and model.config.n_expert and model.config.moe_impl == "sparse":
        # the experts' token counts are data (moe.MoE.sparse): traced as unbacked symbolic sizes,
        # one graph and no recompiles, instead of a graph break at every layer
        torch._dynamo.config.capture_scalar_outputs = True
    fwd_model = torch.compile(model) if tc.compile else model
    if d.world_size == 1:
        return fwd_model, fwd_model
    return fwd_model, DDP(fwd_model, device_ids=[d.local_rank] if d.device_type == "cuda" else None)


def to_device(arrays, device):
    """numpy batch -> device tensors; on CUDA through pinned memory, so the copy does not block."""
    tensors = [torch.from_numpy(a) for a in arrays]
    if device.startswith("cuda"):
        tensors = [t.pin_memory() for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


def accumulate_gradients(ddp_model, model, optimizer, scaler, batches, accum, ctx, d, tc, step):
    """Forward and backward over one step's micro-batches, then unscale and clip (tc.grad_clip).

    Dropout is keyed by (tc.seed, step, each sequence's index in the step): micro-batch `micro`
    on rank `rank` holds the step's sequences from (rank * accum + micro) * B, as the loader lays
    them out, so the masks do not depend on how the step is split (gpt_interventions/dropout.py).

    The loss is the training objective: cross-entropy, plus tc.z_loss times PaLM's z-loss term and
    tc.moe_aux_loss times the experts' balancing loss (GPT.forward). Returns (sum of the micro-batch mean losses, pre-clip global gradient norm), both still on
    the device: nothing here waits for the device, so the next batch is read while it works.
    bench.py times exactly this function.
    """
    loss_sum = torch.zeros((), device=d.device)
    for micro, arrays in enumerate(batches):
        x, y = to_device(arrays, d.device)
        # no dropout: no keys (they would change no bit, tests/test_dropout.py), so no host work
        # or copy to the device in the step
        keys = sequence_keys(tc.seed, step, (d.rank * accum + micro) * len(x), len(x), d.device) \
            if model.config.dropout > 0 else None
        # DDP all-reduces gradients only on the last micro-batch
        sync = ddp_model.no_sync() if d.world_size > 1 and micro < accum - 1 else nullcontext()
        with sync:
            with ctx:
                _, loss = ddp_model(x, y, z_loss=tc.z_loss, moe_aux_loss=tc.moe_aux_loss, dropout_keys=keys)
            loss_sum += loss.detach()
            scaler.scale(loss / accum).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)  # pre-clip global norm
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), tc.grad_clip, norm)
    return loss_sum, norm

