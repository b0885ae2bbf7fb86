"""The run directory on rank 0: log.txt, metrics.jsonl, and checkpoint snapshots."""

import glob
import json
import math
import os
import re

from common import atomic_write, print0


class Run:
    """Run-directory outputs on rank 0: log.txt, metrics.jsonl, config.json, checkpoints."""

    def __init__(self, tc, master, resume_step):
        self.dir, self.master = tc.out_dir, master
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if not master:
            return
        os.makedirs(self.dir, exist_ok=True)
        for name in ("ckpt.pt", "metrics.jsonl", "config.json"):  # temp files of writes a crash cut short
            for stray in glob.glob(glob.escape(os.path.join(self.dir, name)) + ".tmp.*"):
                os.remove(stray)
        if resume_step is not None and os.path.exists(self.metrics_path):
            # rows logged after the checkpoint will be logged again, and a row cut short by a crash
            # ends the file: drop them
            with open(self.metrics_path) as f:
                rows = [line for line in f if line.endswith("\n") and step_of(line) <= resume_step]
            atomic_write(self.metrics_path, lambda f: f.write("".join(rows).encode()))
        self.log_file = open(os.path.join(self.dir, "log.txt"), "a")

    def log(self, msg):
        print0(msg)
        if self.master:
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def metrics(self, row):
        if self.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def keep_snapshots(out_dir, path, step, keep):
    """Hard-link the new checkpoint as ckpt_STEP.pt and delete snapshots beyond the last `keep`."""
    snap = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    if not os.path.exists(snap):
        os.link(path, snap)
    snaps = [m for m in map(re.compile(r"ckpt_(\d+)\.pt").fullmatch, os.listdir(out_dir)) if m]
    for old in sorted(snaps, key=lambda m: int(m[1]))[:-keep]:  # by step: ckpt_10000000 is newer than ckpt_9999999
        os.remove(os.path.join(out_dir, old[0]))


def step_of(line):
    """Step of a metrics.jsonl row; a row cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
