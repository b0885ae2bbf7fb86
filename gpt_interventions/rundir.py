"""The run directory on rank 0: log.txt, metrics.jsonl, and checkpoint snapshots; the trackers
(gpt_interventions/trackers.py) get each metrics row as it is written."""

import glob
import json
import math
import os
import re

from gpt_interventions.atomic import atomic_write
from gpt_interventions.device import print0
from gpt_interventions.trackers import Trackers, open_trackers


class Run:
    """Run-directory outputs on rank 0: log.txt, metrics.jsonl, config.json, checkpoints."""

    def __init__(self, tc, master, resume_step):
        self.dir, self.master = tc.out_dir, master
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.log_path = os.path.join(self.dir, "log.txt")
        self.failed = None  # why an append failed (a full disk): train.py then stops every rank
        self.trackers = Trackers()  # none but on rank 0
        if not master:
            return
        os.makedirs(self.dir, exist_ok=True)
        for name in ("ckpt.pt", "metrics.jsonl", "config.json", "ckpt_[0-9]*.pt", "wandb_run.json"):  # temp files of writes
            for stray in glob.glob(os.path.join(glob.escape(self.dir), name) + ".tmp.*"):  # a crash cut short
                os.remove(stray)
        replayed = 0  # the last step an earlier attempt logged (a restart logs again those after its checkpoint)
        if resume_step is not None and os.path.exists(self.metrics_path):
            # rows logged after the checkpoint will be logged again, and a row cut short by a crash
            # ends the file: drop them
            with open(self.metrics_path) as f:
                lines = [line for line in f if line.endswith("\n")]
            rows = [line for line in lines if step_of(line) <= resume_step]
            atomic_write(self.metrics_path, lambda f: f.write("".join(rows).encode()))
            replayed = max((s for s in map(step_of, lines) if s != math.inf), default=0)
        self.trackers = open_trackers(tc, resume_step or 0, replayed, self.log)

    def log(self, msg):
        print0(msg)
        self._append(self.log_path, msg + "\n")

    def metrics(self, row):
        self._append(self.metrics_path, json.dumps(row) + "\n")
        if self.failed is None:  # the trackers get the rows metrics.jsonl has, no others
            self.trackers.metrics(row)

    def _append(self, path, text):
        """Append on rank 0; after a failure nothing more (a row cut short ends the file, and a
        resume drops it with every row after its checkpoint)."""
        if self.master and self.failed is None:
            try:
                with open(path, "a") as f:  # opened per row: a failed write leaves no buffer behind
                    f.write(text)
            except OSError as e:
                self.failed = f"cannot append to {path} ({e.strerror or e})"


def snapshot_name(step):
    return f"ckpt_{step:07d}.pt"


def keep_snapshots(out_dir, path, step, keep, pinned=frozenset()):
    """Hard-link the new checkpoint as ckpt_STEP.pt and delete snapshots beyond the last `keep`;
    those of the `pinned` steps (--keep_steps: branch points) are never deleted."""
    snap = os.path.join(out_dir, snapshot_name(step))
    tmp = f"{snap}.tmp.{os.getpid()}"
    os.link(path, tmp)
    os.replace(tmp, snap)  # a snapshot left by an attempt that was restarted is replaced, not kept
    snaps = [m for m in map(re.compile(r"ckpt_(\d+)\.pt").fullmatch, os.listdir(out_dir)) if m]
    rotating = sorted((m for m in snaps if int(m[1]) not in pinned), key=lambda m: int(m[1]))  # by step:
    for old in rotating[:max(0, len(rotating) - keep)]:  # ckpt_10000000 is newer than ckpt_9999999
        os.remove(os.path.join(out_dir, old[0]))


def step_of(line):
    """Step of a metrics.jsonl row; a row cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
