"""--auto_batch_size: the largest micro-batch that fits on the device, found by trial steps.

Tokens per step stay what total_batch_size says; only their split into micro-batches changes (a
runtime choice: the same tokens, the same losses up to summation order). Candidates are the
divisors of the sequences each rank trains per step, so the accumulation stays whole; a trial is
one eager training step (forward, backward, AdamW, which allocates its state) on random tokens,
and fitting is monotone in the micro-batch, so a binary search needs about log2(candidates)
trials. A trial fits when its step runs and its peak stays under HEADROOM of the device's memory:
the rest is for what a trial does not hold (DDP's gradient buckets, NCCL's buffers, a compiled
graph, validation). GPUs only: a CPU process that allocates more than the machine has is killed
by the kernel, not told, so there is nothing to search with (tests inject the out-of-memory).
Under DDP every rank searches and the smallest choice wins.
"""

import gc

import torch
import torch.distributed as dist

from gpt_interventions.device import autocast
from gpt_interventions.errors import RunError, UsageError
from gpt_interventions.optimizer import configure_optimizer
from gpt_interventions.step import accumulate_gradients
from model import GPT


def out_of_memory(e):
    """Whether an exception is the device (or the CPU allocator) running out of memory."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


HEADROOM = 0.9  # of the device's memory a trial step may peak at


def trial_step(mc, tc, d, batch_size):
    """One eager training step with micro-batches of `batch_size` sequences: raises on OOM,
    returns its peak memory as a fraction of the device's."""
    if d.device_type != "cuda":
        raise UsageError("--auto_batch_size searches a GPU's memory: on the CPU a step that does not fit is "
                         "killed by the kernel rather than reported; set --batch_size")
    torch.cuda.reset_peak_memory_stats(d.device)
    model = GPT(mc).to(d.device)
    optimizer = configure_optimizer(model, tc, d.device_type)
    scaler = torch.amp.GradScaler(d.device_type, enabled=tc.dtype == "float16")
    x, y = (torch.randint(0, mc.vocab_size, (batch_size, mc.block_size)).numpy() for _ in range(2))
    accumulate_gradients(model, model, optimizer, scaler, [(x, y)], 1,
                         autocast(d.device_type, tc.dtype), d, tc, step=0)
    scaler.step(optimizer)
    torch.cuda.synchronize(d.device)
    return torch.cuda.max_memory_allocated(d.device) / torch.cuda.get_device_properties(d.device).total_memory


def fits(mc, tc, d, batch_size):
    try:
        return trial_step(mc, tc, d, batch_size) <= HEADROOM
    except Exception as e:  # noqa: BLE001 - only an out-of-memory is an answer; anything else is raised
        if not out_of_memory(e):
            raise
        return False
    finally:
        gc.collect()  # the trial's model, optimizer state and activations go before the next trial
        if d.device_type == "cuda":
            torch.cuda.empty_cache()


def largest_micro_batch(mc, tc, d, rows_per_rank):
    """The largest divisor of rows_per_rank whose training step fits (binary search), agreed by all ranks."""
    candidates = [b for b in range(1, rows_per_rank + 1) if rows_per_rank % b == 0]
    lo, hi, best = 0, len(candidates) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mc, tc, d, candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    if d.world_size > 1:
        agreed = torch.tensor([best], device=d.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        best = int(agreed.item())
    if best == 0:
        raise RunError(f"not even a micro-batch of 1 sequence of {mc.block_size} tokens fits on {d.device}: "
                       "use a smaller model or block_size, or a device with more memory")
    return best


def rows_per_rank(mc, tc, world_size):
    """Sequences each rank trains per step: the pool --auto_batch_size splits into micro-batches."""
    if tc.gradient_accumulation_steps:
        raise UsageError("--auto_batch_size chooses the micro-batch and so the accumulation: leave "
                         "--gradient_accumulation_steps at 0")
    if not tc.total_batch_size:
        raise UsageError("--auto_batch_size needs --total_batch_size (with 0 the micro-batch would set the "
                         "tokens per step, and a run's tokens per step must not depend on its device)")
    per_rank = mc.block_size * world_size
    if tc.total_batch_size % per_rank:
        raise UsageError(f"total_batch_size {tc.total_batch_size} is not a whole number of {mc.block_size}-token "
                         f"sequences for each of {world_size} rank(s)")
    return tc.total_batch_size // per_rank
