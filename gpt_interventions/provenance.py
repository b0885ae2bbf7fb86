"""What produced a result: the code version, the libraries and the hardware, recorded beside it."""

import os
import platform
import subprocess

import torch

from gpt_interventions import ROOT


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    """Library versions, code version and hardware, recorded beside every result."""
    import numpy
    info = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        # a CPU run's numbers depend on its thread count (LayerNorm's backward sums per thread),
        # not on the machine's load: two runs are bitwise equal only with the same count
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    return info
