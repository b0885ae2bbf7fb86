"""Checkpoints: plain data (dicts of numbers, strings and state dicts), written atomically.

`torch.load(path, weights_only=True)` reads them; no pickled objects, no compiled or DDP prefixes.
"""

import os
import zipfile

import torch

from gpt_interventions.atomic import atomic_write
from gpt_interventions.errors import UsageError

CHECKPOINT_VERSION = 1


def model_config_of(saved):
    """A saved model config as today's GPTConfig fields: runs saved before the `init` switch
    existed were initialised as GPT-2 (init = "gpt2"), and runs saved before `moe_impl` existed
    computed their experts densely (so they resume bitwise), whatever today's defaults."""
    return {"init": "gpt2", "moe_impl": "dense", **saved}


def save_checkpoint(path, ckpt):
    def write(f):
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:  # torch reports a failed write (ENOSPC, EIO) as a RuntimeError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    atomic_write(path, write)


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoints with weights_only=True; UsageError naming the file if not."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} not found")
    try:
        with zipfile.ZipFile(path) as z:  # torch.load does not check the CRCs torch.save writes
            bad = z.testzip()
        if bad is not None:
            raise ValueError(f"CRC mismatch in {bad}")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, corrupted bytes, foreign pickles all land here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {path} is unreadable ({msg[:120]}); "
                         "restore it from a backup or start a new run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "gpt-interventions":
        raise UsageError(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint version {ckpt.get('version')}, "
                         f"this code reads version {CHECKPOINT_VERSION}")
    return ckpt
