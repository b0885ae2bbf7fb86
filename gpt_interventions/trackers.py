"""Experiment trackers: TensorBoard and Weights & Biases see what the run directory records.

`--tracker=none|tensorboard|wandb` (comma-separated for both). On rank 0 every metrics.jsonl row
(rundir.Run.metrics), the resolved config (config.json) and the charts drawn at the end go to each
chosen tracker too, with the optimizer step as the global step. Their packages are imported only
when chosen, so neither is a dependency of a run that does not use it.

A tracker is a mirror, never a reason to lose a run: if one raises (a network error, a full
disk), one line goes to the log and nothing more is sent to it; metrics.jsonl keeps every row.

A restarted run continues the same tracker run. TensorBoard writes into out_dir/tensorboard/
again, and its writer opens with a SessionLog.START event at the first step the restart logs
again (SummaryWriter's purge_step), which tells readers to drop the earlier events from that
step on, so the replayed rows are read once, with the values metrics.jsonl has. Every attempt
writes one (step 0 for a new run), because TensorBoard's own loader takes a run's first START
for its start, not a restart (tensorboard PR #4763). wandb resumes the run whose id
out_dir/wandb_run.json holds (resume="allow"); its history cannot be rewritten and its steps
only increase, so rows at steps an earlier attempt already sent are not sent again.
"""

import importlib.util
import json
import os
import struct
import sys
import uuid

from gpt_interventions.atomic import write_json
from gpt_interventions.errors import UsageError

TRACKERS = ("tensorboard", "wandb")  # each is also the name of its package on PyPI
WANDB_ID_FILE = "wandb_run.json"


def tracker_names(spec):
    """The trackers a --tracker value chooses, in order; UsageError for anything else."""
    names = [name.strip() for name in spec.split(",")]
    if names == ["none"]:
        return []
    if not all(name in TRACKERS for name in names):
        raise UsageError(f"--tracker={spec!r}: give none, tensorboard, wandb or tensorboard,wandb")
    return list(dict.fromkeys(names))


def check_trackers(spec):
    """Refuse an unknown tracker, or one whose package is missing, before the run writes anything
    (on every rank, so that no rank starts a run that another refuses)."""
    for name in tracker_names(spec):
        if not _installed(name):
            raise UsageError(f"--tracker={name} needs the {name} package, which is not installed: "
                             f"pip install {name} (or choose --tracker=none)")


def _installed(package):
    if package in sys.modules:  # imported already (or blocked by a None entry)
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def scalars(row):
    """A metrics row as tracker scalars: training rows under train/, validation rows under val/,
    every number but the step (which is the global step); booleans as 0/1, None left out; a list
    (expert_frac: layers of experts) as one scalar per entry, its indices in the tag
    (train/expert_frac/0/1: layer 0, expert 1)."""
    kind = "val" if "val_loss" in row else "train"
    out = {}

    def add(tag, value):
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                add(f"{tag}/{i}", item)
        elif value is not None:
            out[tag] = float(value)

    for key, value in row.items():
        if key != "step":
            add(f"{kind}/{key}", value)
    return out


class Trackers:
    """The chosen trackers of one run (none on ranks other than 0). Each call goes to each tracker;
    one that raises is dropped with one line through `log`."""

    def __init__(self, sinks=(), log=print):
        self.sinks, self.log = dict(sinks), log

    def config(self, config, step):
        self._each("sending the config", lambda sink: sink.config(config, step))

    def metrics(self, row):
        if self.sinks:
            values = scalars(row)
            self._each(f"logging step {row['step']}", lambda sink: sink.metrics(row["step"], values))

    def images(self, paths, step):
        self._each("sending the charts", lambda sink: sink.images(paths, step))

    def close(self):
        self._each("closing", lambda sink: sink.close())
        self.sinks = {}

    def _each(self, what, call):
        for name, sink in list(self.sinks.items()):
            try:
                call(sink)
            except Exception as e:  # any failure of a tracker's library: the run itself goes on
                del self.sinks[name]
                self.log(_failed(name, what, e))


def open_trackers(tc, start, replayed, log):
    """Trackers for rank 0 of a run starting at step `start` (its checkpoint's; 0 without one);
    `replayed` is the last step an earlier attempt logged (0 if none), rows up to which the
    restart logs again. A tracker that cannot start is left out with one line."""
    sinks = {}
    for name in tracker_names(tc.tracker):
        try:
            sinks[name] = TensorBoard(tc.out_dir, start) if name == "tensorboard" else \
                WandB(tc.out_dir, tc.run_name, replayed)
        except Exception as e:  # no network, no wandb login: the run goes on without it
            log(_failed(name, "starting", e))
    return Trackers(sinks, log)


def _failed(name, what, e):
    why = f"{type(e).__name__}: {e}".replace("\r", " ").replace("\n", " ")
    return f"tracker {name} failed while {what} ({why}); the run goes on without it (metrics.jsonl has every row)"


class TensorBoard:
    """Event files in out_dir/tensorboard/ (torch's SummaryWriter); flushed after each call, so
    a crash loses nothing that metrics.jsonl has."""

    def __init__(self, out_dir, start):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start + 1 if start else 0)

    def config(self, config, step):
        # a Markdown code block (4-space indent): the text dashboard shows the JSON as written
        self.writer.add_text("config", "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines()),
                             step)
        self.writer.flush()

    def metrics(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def images(self, paths, step):
        """The PNG files as they are (no decoding and encoding again), tagged charts/NAME."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        for path in paths:
            with open(path, "rb") as f:
                png = f.read()
            width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk, first in every PNG
            channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(png[25], 4)  # IHDR colour type -> channels
            image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
            tag = "charts/" + os.path.splitext(os.path.basename(path))[0]
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A wandb run, resumed by the id in out_dir/wandb_run.json. WANDB_MODE, WANDB_PROJECT (else
    gpt-interventions), WANDB_ENTITY and WANDB_DIR (else out_dir) are wandb's own settings."""

    def __init__(self, out_dir, run_name, replayed):
        import wandb
        self.wandb, self.replayed = wandb, replayed
        path = os.path.join(out_dir, WANDB_ID_FILE)
        if os.path.exists(path):
            with open(path) as f:
                run_id = json.load(f)["id"]
        else:  # stored before wandb starts: a restart after a crash in init continues the same run
            run_id = uuid.uuid4().hex[:16]
            write_json(path, {"id": run_id})
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "gpt-interventions", name=run_name,
                              id=run_id, resume="allow", dir=os.environ.get("WANDB_DIR") or out_dir,
                              settings=wandb.Settings(console="off"))  # log.txt holds the run's output

    def config(self, config, step):
        self.run.config.update(config, allow_val_change=True)  # a resumed run's env may differ

    def metrics(self, step, values):
        if step > self.replayed:
            self.run.log(values, step=step)

    def images(self, paths, step):
        self.run.log({"charts/" + os.path.splitext(os.path.basename(p))[0]: self.wandb.Image(p) for p in paths},
                     step=step)

    def close(self):
        self.run.finish()
