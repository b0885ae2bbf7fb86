"""train.py with one fault injected, for tests/test_reliability.py: python tests/fault_train.py FLAGS...

FAULT (environment) chooses the fault; files go to FAULT_DIR:
  hang_at_step:N   before step N (N steps done): write ready.RANK (the pid), wait for the file `go`
  hang_in_save:N   while writing the checkpoint of step N, half of it in the temp file: write
                   ready.RANK, hang until killed
  rss:N            every N steps append "STEP VmRSS_kB" to rss.txt
  full_log:N       rank 0's append of step N's row to metrics.jsonl fails as on a full disk
  die_once:N       before step N, rank FAULT_RANK (default 1) dies at once (exit 1, no cleanup), the
                   first time only (a file `died` marks it): torchrun --max-restarts then restarts all
"""

import errno
import io
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402
from gpt_interventions import loader, rundir  # noqa: E402
from gpt_interventions.errors import run_main  # noqa: E402

FAULT_DIR = os.environ.get("FAULT_DIR", ".")
KIND, _, ARG = os.environ.get("FAULT", "").partition(":")
RANK = os.environ.get("RANK", "0")


def ready():
    with open(os.path.join(FAULT_DIR, f"ready.{RANK}"), "w") as f:
        f.write(str(os.getpid()))


def wait_for_go(limit_s=120):
    deadline = time.time() + limit_s  # never outlive a test that failed
    while not os.path.exists(os.path.join(FAULT_DIR, "go")):
        if time.time() > deadline:
            os._exit(99)
        time.sleep(0.01)


def rss_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


batch = loader.TrainLoader.batch
save = torch.save
seen = set()


def faulty_batch(self, step, micro):
    if micro == 0 and step not in seen:  # the first read of each step (train also reads one up front)
        seen.add(step)
        if KIND == "hang_at_step" and step == int(ARG):
            ready()
            wait_for_go()
        elif KIND == "die_once" and step == int(ARG) and RANK == os.environ.get("FAULT_RANK", "1") \
                and not os.path.exists(os.path.join(FAULT_DIR, "died")):
            open(os.path.join(FAULT_DIR, "died"), "w").close()
            os._exit(1)
        elif KIND == "rss" and step % int(ARG) == 0:
            with open(os.path.join(FAULT_DIR, "rss.txt"), "a") as f:
                f.write(f"{step} {rss_kb()}\n")
    return batch(self, step, micro)


def faulty_save(obj, f, *args, **kwargs):
    if KIND == "hang_in_save" and isinstance(obj, dict) and obj.get("step") == int(ARG):
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        ready()
        while True:
            time.sleep(1)
    return save(obj, f, *args, **kwargs)


def faulty_open(file, mode="r", *args, **kwargs):
    f = open(file, mode, *args, **kwargs)
    if KIND == "full_log" and str(file).endswith("metrics.jsonl") and "a" in mode:
        write = f.write

        def full(text):
            if f'"step": {int(ARG)},' in text:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(text)
        f.write = full
    return f


loader.TrainLoader.batch = faulty_batch
torch.save = faulty_save
rundir.open = faulty_open

if __name__ == "__main__":
    run_main(train.main)
